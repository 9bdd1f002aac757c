"""`benchmarks.tpu_step_estimate`: which TPU estimates are usable, how the runner's extras are
attributed, the bare step it is compared with, and the table of the docs page."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import host_load
from benchmarks import tpu_step_estimate as estimate_lib
from experiments import generated_section
from experiments import memory_plan
from nfnets_jax.train import one_device_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_LIBTPU = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install -c requirements/lock.txt -e \".[tpu-plan]\"")


def test_only_a_positive_estimate_no_faster_than_the_flops_at_peak_is_usable():
    flops = 1.32e12  # an F0 step at 32 images: 21.5 ms at a TPUv3 core's 61.5 TFLOP/s
    assert estimate_lib.estimate_problem(0.0378, flops, 61.5) is None
    assert estimate_lib.estimate_problem(flops / 61.5e12, flops, 61.5) is None  # exactly the roofline
    assert "below the program's FLOPs at peak" in estimate_lib.estimate_problem(0.0100, flops, 61.5)
    # libtpu 0.0.42.1's TPUv4 megacore: a negative estimate, never a number to divide by.
    assert "-378" in estimate_lib.estimate_problem(-378.0, flops, 275.0)
    assert estimate_lib.estimate_problem(0.0, flops, 275.0) is not None
    assert estimate_lib.estimate_problem(float("nan"), flops, 275.0) is not None
    assert "no run-time estimate" in estimate_lib.estimate_problem(None, flops, 61.5)


def test_the_runner_over_the_bare_step_is_split_into_metrics_and_the_rest():
    programs = {"step": {"estimate_ms": 40.0}, "step_state": {"estimate_ms": 39.0}, "bare": {"estimate_ms": 37.5}}
    extras = estimate_lib.runner_extras(programs)
    assert extras["ratio"] == pytest.approx(40.0 / 37.5)
    assert extras["extra_ms"] == pytest.approx(2.5)
    assert extras["metrics_ms"] == pytest.approx(1.0)
    assert extras["guard_means_rng_ms"] == pytest.approx(1.5)
    assert extras["metrics_ms"] + extras["guard_means_rng_ms"] == pytest.approx(extras["extra_ms"])
    refused = estimate_lib.runner_extras({**programs, "bare": {"refused": "RESOURCE_EXHAUSTED: ..."}})
    assert refused["ratio"] is refused["extra_ms"] is refused["guard_means_rng_ms"] is None
    assert refused["metrics_ms"] == pytest.approx(1.0)  # step and step_state still compare
    two = estimate_lib.runner_extras({"step": programs["step"], "bare": programs["bare"]})  # --programs step,bare
    assert two["ratio"] == pytest.approx(40.0 / 37.5) and two["metrics_ms"] is two["guard_means_rng_ms"] is None


def _row(target, valid=True):
    program = {"estimate_ms": 36.7, "flops": 1.32e12, "bytes_accessed": 11.05e9, "peak_gib": 6.1, "compile_s": 355.0}
    programs = {name: dict(program) for name in estimate_lib.PROGRAMS}
    programs["bare"]["estimate_ms"] = 36.0
    choices = {"grouped_convs_as": "xla", "activation_backward": "XLA's choice"}
    return {"config": "nfnet.py:F0", "target": target, "image_size": 192, "per_device_batch": 32, "remat": False,
            "choices": choices, "compiled_in": estimate_lib.ALONE,
            "estimate_valid": valid, "no_estimate_because": None if valid else "the compiler's estimate is -394 s",
            "programs": programs,
            "runner_over_bare": estimate_lib.runner_extras(programs) if valid else None}


def test_the_docs_table_has_one_full_line_per_row_and_says_no_estimate_where_there_is_none():
    table = estimate_lib.markdown_table([_row("tpu-v3"), _row("tpu-v4", valid=False)]).splitlines()
    assert len(table) == 4 and len({line.count("|") for line in table}) == 1
    assert "| nfnet.py:F0 | tpu-v3 | 192 | 32 | off | **36.70** | 36.00 | 1.019× |" in table[2]
    assert "11.05" in table[2] and "355 / 355" in table[2] and "xla convs, activations kept" in table[2]
    assert "no estimate (the compiler's estimate is -394 s)" in table[3] and "36.70" not in table[3]
    # a row that records its weight standardisation's layout says it (older rows do not have it)
    row = _row("tpu-v3")
    row["choices"]["weight_standardisation_statistics"] = "over the kernel's axes"
    assert "xla convs, activations kept, WS statistics over the kernel's axes |" in estimate_lib.markdown_table([row])


def test_bad_arguments_are_one_error_before_any_compile(capsys):
    for argv in (["--targets", "tpu-v9"], ["--programs", "step,train"], ["--only", "nope.py:F0"],
                 ["--per_device_batch", "0"], ["--compile_repeats", "0"],
                 ["--compile_repeats", "3", "--programs", "step,fwd_bwd"]):
        with pytest.raises(SystemExit):
            estimate_lib.main(argv)
        assert "error:" in capsys.readouterr().err


def test_a_config_and_its_overrides_reach_each_targets_child_process():
    """With several targets each is compiled in a child process: it must get the same config."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    from experiments import command_line  # pylint: disable=import-outside-toplevel

    given = ["--config=configs/digits.py", "--config.train.batch_size", "24", "--noconfig.data.synthetic.encode_jpeg"]
    command_line.parse_flags(["tpu_step_estimate", *given], lambda: estimate_lib._CONFIG.value,
                             flag_values=estimate_lib.FLAGS, multihost=False, positional=False)
    child = estimate_lib._child_command("digits.py", "tpu-v3", ["step"])
    assert not any(arg.startswith("--only") for arg in child)
    child_flags = flags.FlagValues()
    child_config = command_line.define_config_flag(child_flags, "as the child defines it", None)
    child_args = [arg for arg in child if arg.startswith(("--config", "--noconfig"))]
    command_line.parse_flags(["child", *child_args], lambda: child_config.value, flag_values=child_flags,
                             multihost=False, positional=False)
    assert child_config.value.train.batch_size == 24 and child_config.value.data.synthetic.encode_jpeg is False
    assert child_config.value == estimate_lib._CONFIG.value


def test_the_table_mode_reads_json_lines(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text("# a comment line\n" + "\n".join(json.dumps(_row(t)) for t in ("tpu-v3", "tpu-v5e")) + "\n")
    estimate_lib.main(["--table", str(path)])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 20 and out[0] == "| goal | measured | met? |" and out[6] == ""
    out = out[7:]  # the goals first, then the table
    assert "tpu-v5e" in out[3] and out[4] == "" and out[5].startswith("The runner's step")
    assert out[6] == "" and out[7].startswith("Compile time of the runner's step")
    assert out[9].startswith("| config | target | px | batch | DeepMind's step (ms) |")
    assert out[12] == "No config has both DeepMind's step and ours compiled without remat yet."


def _deepmind(config, target, step_ms, fwd_bwd_ms=None, date="2026-12-06"):
    """A row of DeepMind's step, as docs/tpu_step_cost.jsonl keeps them."""
    programs = {"step": {"estimate_ms": step_ms, "bytes_accessed": 11.57e9} if step_ms is not None else
                {"refused": "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm."}}
    if fwd_bwd_ms is not None:
        programs["fwd_bwd"] = {"estimate_ms": fwd_bwd_ms, "bytes_accessed": 8.62e9}
    return {"code": estimate_lib.DEEPMIND, "config": config, "target": target, "image_size": 192,
            "per_device_batch": 32, "programs": programs, "date": date}


def _ours(config, target, step_ms, fwd_bwd_ms=None, remat=False):
    row = _variant(config, target, step_ms, step_ms)
    row["remat"] = remat
    if fwd_bwd_ms is not None:
        row["programs"]["fwd_bwd"] = {"estimate_ms": fwd_bwd_ms}
    return row


def test_our_step_is_compared_with_deepminds_where_both_ran_without_remat():
    rows = [_deepmind("nfnet.py:F0", "tpu-v3", 40.0, 32.0, date="2026-12-05"),
            _deepmind("nfnet.py:F0", "tpu-v3", 38.0, 31.0),  # a rerun replaces the row above
            _ours("nfnet.py:F0", "tpu-v3", 36.1, 30.69),
            _deepmind("nfnet.py:F4", "tpu-v3", 600.0),  # ours there only with remat: not the same program
            _ours("nfnet.py:F4", "tpu-v3", 640.0, remat=True),
            _deepmind("nfnet.py:F2", "tpu-v5p", 44.0),
            _ours("nfnet.py:F2", "tpu-v5p", 45.54),
            _deepmind("nfnet.py:F1", "tpu-v5p", 28.0),  # ours not compiled there
            _deepmind("nfnet.py:F5", "tpu-v3", None),  # refused: more than the core's HBM
            _ours("nfnet.py:F5", "tpu-v3", 890.0, remat=True),
            _ours("nfnet.py:F5", "tpu-v3", 880.0, remat=False)]  # our row without remat is the one compared
    # DeepMind's rows are not rows of our table
    assert [(r["config"], r["target"], r["remat"]) for r in estimate_lib.latest_rows(rows)] == [
        ("nfnet.py:F0", "tpu-v3", False), ("nfnet.py:F2", "tpu-v5p", False), ("nfnet.py:F4", "tpu-v3", True),
        ("nfnet.py:F5", "tpu-v3", True), ("nfnet.py:F5", "tpu-v3", False)]
    lines = estimate_lib.deepmind_comparison(rows).splitlines()
    assert len(lines) == 2 + 5 + 2 and len({line.count("|") for line in lines[:7]}) == 1
    # 36.1 / 38.0 = 0.950, 30.69 / 31.0 = 0.990; 45.54 / 44.0 = 1.035
    assert lines[2] == ("| nfnet.py:F0 | tpu-v3 | 192 | 32 | 38.00 | **36.10** | 0.950× | 31.00 | 30.69 | 0.990× "
                        "| 11.57 / 11.05 | 2026-12-06 |")
    assert lines[3].startswith("| nfnet.py:F1 | tpu-v5p | 192 | 32 | 28.00 | **—** | — |")
    assert lines[4].startswith("| nfnet.py:F2 | tpu-v5p | 192 | 32 | 44.00 | **45.54** | 1.035× | — | — | — |")
    # our remat step is shown, marked, and not divided by DeepMind's
    assert lines[5].startswith("| nfnet.py:F4 | tpu-v3 | 192 | 32 | 600.00 | **640.00** (remat) | — |")
    assert lines[6].startswith("| nfnet.py:F5 | tpu-v3 | 192 | 32 | does not fit | **880.00** | — |")
    assert lines[8] == ("Our step over DeepMind's: 0.950× to 1.035× over the 2 configs and targets with both; above "
                        "the 1.00× goal: nfnet.py:F2 on tpu-v5p 1.035×; at or below the 0.95× stretch goal: "
                        "nfnet.py:F0 on tpu-v3. Our forward + backward over DeepMind's: 0.990× over the 1 config "
                        "and target with both; above the 1.00× goal: none. "
                        "DeepMind's step does not fit the device at that batch (the compiler "
                        "refused it): nfnet.py:F5 on tpu-v3. Ours fits there without remat: nfnet.py:F5 on tpu-v3, "
                        "880.00 ms. DeepMind's step fits without remat where ours needs it: "
                        "nfnet.py:F4 on tpu-v3, ours with remat 1.067× DeepMind's step.")  # 640 / 600
    one = estimate_lib.deepmind_comparison(rows[1:3]).splitlines()[-1]
    assert one == ("Our step over DeepMind's: 0.950× over the 1 config and target with both; above the 1.00× goal: "
                   "none; at or below the 0.95× stretch goal: nfnet.py:F0 on tpu-v3. Our forward + backward over "
                   "DeepMind's: 0.990× over the 1 config and target with both; above the 1.00× goal: none.")


def test_the_goals_table_says_which_goal_is_met_and_names_each_miss():
    rows = [_deepmind("nfnet.py:F0", "tpu-v3", 38.0, 31.0), _ours("nfnet.py:F0", "tpu-v3", 36.1, 30.69),
            _deepmind("nfnet.py:F2", "tpu-v5p", 44.0), _ours("nfnet.py:F2", "tpu-v5p", 45.54),
            _variant("nfnet.py:F1", "tpu-v5p", 44.0, 40.0)]
    rows[3]["programs"]["step"]["compile_s"] = 400.0  # over the bare step's 355 s
    lines = estimate_lib.goals(rows).splitlines()
    assert lines[:2] == ["| goal | measured | met? |", "|---|---|---|"] and len(lines) == 6
    # 36.1 / 38.0 = 0.950 (at the stretch goal), 45.54 / 44.0 = 1.035; 30.69 / 31.0 = 0.990
    assert lines[2] == ("| ours / DeepMind's, the whole train step: ≤ 1.00× (stretch ≤ 0.95×) | 0.950× to 1.035× "
                        "over 2 configs × targets | **no**: 1 of 2 above (F2 on tpu-v5p 1.035×); at or below "
                        "0.95×: 1 (F0 on tpu-v3) |")
    assert lines[3] == ("| ours / DeepMind's, the forward + backward: ≤ 1.00× | 0.990× over 1 config × target "
                        "| yes |")
    # runner / bare: 36.1 / 36.1, 44 / 40 = 1.100, 45.54 / 45.54
    assert lines[4] == ("| the runner's step / the bare step: ≤ 1.02× | 1.000× to 1.100× over 3 rows | **no**: "
                        "1 of 3 above (F1 on tpu-v5p 1.100×) |")
    # compile: 355 / 355 twice, 400 / 355 = 1.13
    assert lines[5] == ("| compile time, the runner's step / the bare step's: ≤ 1.1× | 1.00× to 1.13× over 3 rows "
                        "| **no**: 1 of 3 above (F2 on tpu-v5p 1.13×) |")
    alone = estimate_lib.goals([_variant("nfnet.py:F0", "tpu-v3", 36.0, 36.0)]).splitlines()
    assert alone[2] == "| ours / DeepMind's, the whole train step: ≤ 1.00× (stretch ≤ 0.95×) | not measured | — |"
    assert alone[4].endswith("| 1.000× over 1 row | yes |") and alone[5].endswith("| 1.00× over 1 row | yes |")


def _variant(config, target, step_ms, bare_ms, step_state_ms=None):
    row = _row(target)
    row["config"] = config
    row["programs"] = {"step": {**row["programs"]["step"], "estimate_ms": step_ms},
                       "bare": {**row["programs"]["bare"], "estimate_ms": bare_ms}}
    if step_state_ms is not None:
        row["programs"]["step_state"] = {**row["programs"]["step"], "estimate_ms": step_state_ms}
    row["runner_over_bare"] = estimate_lib.runner_extras(row["programs"])
    return row


def test_a_rerun_replaces_its_row_and_the_summary_names_each_row_above_the_target():
    rows = [_variant("nfnet.py:F2", "tpu-v5p", 45.0, 43.0),  # replaced by the rerun below
            _variant("nfnet.py:F1", "tpu-v5p", 30.59, 30.0),  # 1.0197×: below the target
            _variant("nfnet.py:F0", "tpu-v3", 36.0, 36.1),
            _variant("nfnet.py:F2", "tpu-v5p", 44.0, 40.0, step_state_ms=41.0),
            _variant("nfnet.py:F2", "tpu-v3", 148.0, 140.0)]
    latest = estimate_lib.latest_rows(rows)
    assert [(r["config"], r["target"]) for r in latest] == [
        ("nfnet.py:F0", "tpu-v3"), ("nfnet.py:F1", "tpu-v5p"), ("nfnet.py:F2", "tpu-v3"), ("nfnet.py:F2", "tpu-v5p")]
    assert latest[3]["programs"]["step"]["estimate_ms"] == 44.0
    # ratios: 36.0/36.1 = 0.997, 1.020, 148/140 = 1.057, 44/40 = 1.100 (metrics 3.0 ms, the rest 1.0 ms)
    assert estimate_lib.summary(latest) == (
        "The runner's step over the bare step: 0.997× to 1.100× over the 4 rows with both estimates; above "
        "the 1.02× target: nfnet.py:F2 on tpu-v3 at 32 per device 1.057× (+8.00 ms; split not compiled: add "
        "step_state to --programs); nfnet.py:F2 on tpu-v5p at 32 per device 1.100× (+4.00 ms; metrics +3.00 ms, "
        "guard, means and RNG +1.00 ms).")
    assert estimate_lib.summary(latest[:2]).endswith("none is above the 1.02× target.")
    # One row: no range, no plural; 1.0204 prints as 1.020×, so it is not said to be above 1.02×.
    assert estimate_lib.summary([_variant("nfnet.py:F0", "tpu-v3", 36.0, 36.1)]).startswith(
        "The runner's step over the bare step: 0.997× over the 1 row with both estimates;")
    assert estimate_lib.summary([_variant("nfnet.py:F0", "tpu-v3", 30.612, 30.0)]).endswith(
        "1.020× over the 1 row with both estimates; none is above the 1.02× target.")


def _dated(row, date, commit):
    return {**row, "date": date, "provenance": {"git": {"commit": commit + "0" * 33}}}


def test_a_row_that_adds_the_forward_and_backward_fills_the_cells_of_the_row_with_both_steps():
    full = _dated(_variant("nfnet.py:F1", "tpu-v5p", 26.84, 26.67), "2026-12-06", "9cbff68")
    full["programs"]["step"]["compile_s"], full["programs"]["bare"]["compile_s"] = 300.0, 250.0
    # `--programs step,fwd_bwd`: its own step compile (another sitting) must not replace the pair's
    added = _dated(_variant("nfnet.py:F1", "tpu-v5p", 26.90, 26.90), "2026-12-07", "abcdef1")
    added["programs"] = {"step": {**added["programs"]["step"], "compile_s": 999.0},
                         "fwd_bwd": {"estimate_ms": 18.00}}
    other_choices = _dated(_variant("nfnet.py:F1", "tpu-v5p", 30.0, 30.0), "2026-12-08", "1234567")
    other_choices["programs"] = {"step": other_choices["programs"]["step"], "forward": {"estimate_ms": 5.0}}
    other_choices["choices"] = {**other_choices["choices"], "grouped_convs_as": "split per group"}
    deepmind = _deepmind("nfnet.py:F1", "tpu-v5p", 27.97, 18.48)
    rows = [full, added, other_choices, deepmind]
    (row,) = estimate_lib.latest_rows(rows)
    assert row["programs"]["step"]["estimate_ms"] == 26.84 and row["programs"]["bare"]["estimate_ms"] == 26.67
    assert row["programs"]["fwd_bwd"]["estimate_ms"] == 18.00 and "forward" not in row["programs"]
    assert row["added_from"] == {"fwd_bwd": "2026-12-07, abcdef1"}
    line = estimate_lib.markdown_table([row]).splitlines()[2]
    assert "| **26.84** | 26.67 | 1.006× |" in line and "| 18.00† | — |" in line and "| 300 / 250 |" in line
    assert estimate_lib.render(rows).endswith(
        "† Compiled in another row than the row's runner's and bare step, with the same implementation choices: "
        "fwd_bwd of nfnet.py:F1 on tpu-v5p (2026-12-07, abcdef1).")
    comparison = estimate_lib.deepmind_comparison(rows)
    assert "| 27.97 | **26.84** | 0.960× | 18.48 | 18.00† | 0.974× |" in comparison  # 26.84/27.97, 18.00/18.48
    # the inputs are left as they were
    assert "fwd_bwd" not in full["programs"] and "added_from" not in full
    # a later row with both steps is shown instead, and still gets the forward + backward
    rerun = _dated(_variant("nfnet.py:F1", "tpu-v5p", 26.70, 26.60), "2026-12-09", "7654321")
    (row,) = estimate_lib.latest_rows(rows + [rerun])
    assert row["programs"]["step"]["estimate_ms"] == 26.70 and row["added_from"] == {"fwd_bwd": "2026-12-07, abcdef1"}


def test_compile_time_compares_cpu_seconds_where_both_have_them_and_names_each_row_above_the_target():
    def timed(config, target, step, bare):
        row = _variant(config, target, 40.0, 40.0)
        row["programs"]["step"] = {**row["programs"]["step"], **step}
        row["programs"]["bare"] = {**row["programs"]["bare"], **bare}
        row["compiled_in"] = estimate_lib.ALONE
        return row

    rows = [timed("nfnet.py:F0", "tpu-v3", {"compile_s": 495.0}, {"compile_s": 649.0}),  # wall only: 0.76×
            timed("nfnet.py:F3", "tpu-v3", {"compile_s": 704.0, "compile_cpu_s": 480.0},
                  {"compile_s": 366.0, "compile_cpu_s": 373.0}),  # CPU: 480 / 373 = 1.29× (wall would be 1.92×)
            timed("nfnet.py:F2", "tpu-v3", {"compile_s": 845.0, "compile_cpu_s": 418.0},
                  {"compile_s": 727.0}),  # the bare step has no CPU time: wall, 845 / 727 = 1.16×
            timed("nfnet.py:F1", "tpu-v5p", {"compile_s": 230.0, "compile_cpu_s": 362.0},
                  {"compile_s": 228.0, "compile_cpu_s": 353.0})]  # 1.03×
    assert estimate_lib.compile_summary(rows) == (
        "Compile time of the runner's step over the bare step's (each compiled in a process of its own; CPU "
        "seconds where both were recorded, else wall seconds): 0.76× to 1.29× over the 4 rows with both; above "
        "the 1.1× target: nfnet.py:F3 on tpu-v3 1.29× (480 / 373 CPU s); nfnet.py:F2 on tpu-v3 1.16× (845 / 727 s).")
    assert estimate_lib.compile_summary(rows[3:]) == (
        "Compile time of the runner's step over the bare step's (each compiled in a process of its own; CPU "
        "seconds where both were recorded, else wall seconds): 1.03× over the 1 row with both; none is above "
        "the 1.1× target.")
    # A row whose programs were compiled one after another in one process is counted, not compared:
    # the runner's step, compiled first, paid for being first.
    shared = timed("nfnet.py:F4", "tpu-v5p", {"compile_cpu_s": 836.0}, {"compile_cpu_s": 711.0})
    del shared["compiled_in"]
    assert estimate_lib.compile_summary([*rows[3:], shared]).endswith(
        "none is above the 1.1× target. 1 older row, whose programs were compiled one after another in one "
        "process (the runner's step first), is not compared.")
    no_bare = _variant("nfnet.py:F0", "tpu-v3", 40.0, 40.0)
    del no_bare["programs"]["bare"]
    assert estimate_lib.compile_summary([no_bare]) == (
        "No row has both programs' compile times, each from a process of its own, yet.")


def test_a_compile_records_how_many_cores_other_work_kept_busy_beside_it(monkeypatch):
    """Host CPU seconds 100 -> 103.5 over a compile of 2 s wall that used 1.5 CPU s itself: the
    other work kept (3.5 - 1.5) / 2 = 1.0 core busy, and the compile-time line says so."""
    assert host_load.others_cores(100.0, 103.5, 1.5, 2.0) == pytest.approx(1.0)
    assert host_load.others_cores(100.0, 101.0, 1.2, 2.0) == 0.0  # clock ticks round: never below 0
    assert host_load.others_cores(None, 103.5, 1.5, 2.0) is None  # a host without /proc/stat
    busy = iter([100.0, 101.0])  # 1 host CPU second over the compile, at most what it used itself
    monkeypatch.setattr(host_load, "busy_cpu_seconds", lambda: next(busy))
    import jax  # pylint: disable=import-outside-toplevel
    measured = estimate_lib.measure_program(jax.jit(lambda x: x * 2), (jax.ShapeDtypeStruct((4,), "float32"),))
    assert measured["others_cores"] >= 0.0 and measured["compile_s"] > 0
    row = _variant("nfnet.py:F2", "tpu-v5p", 41.0, 42.0)
    row["programs"]["step"].update(compile_cpu_s=420.0, others_cores=0.04)
    row["programs"]["bare"].update(compile_cpu_s=350.0, others_cores_runs=[0.02, 1.03])
    assert estimate_lib.busiest_others(row) == 1.03
    assert estimate_lib.compile_summary([row]).endswith(
        "above the 1.1× target: nfnet.py:F2 on tpu-v5p 1.20× (420 / 350 CPU s; other work beside it: up to "
        "1.0 cores).")
    del row["programs"]["bare"]["others_cores_runs"], row["programs"]["step"]["others_cores"]
    assert estimate_lib.busiest_others(row) is None and "other work" not in estimate_lib.compile_summary([row])


def test_repeated_compiles_alternate_in_balanced_pairs_and_the_median_is_compared():
    calls = []
    seconds = {"step": iter([330.0, 290.0, 300.0]), "bare": iter([260.0, 270.0, 280.0])}

    def measure(name):
        calls.append(name)
        cpu = next(seconds[name])
        return {"estimate_ms": 26.5, "compile_s": cpu + 5, "compile_cpu_s": cpu}

    results = {"step": {"estimate_ms": 26.5, "compile_s": 327.0, "compile_cpu_s": 322.0},
               "bare": {"estimate_ms": 26.7, "compile_s": 264.0, "compile_cpu_s": 259.0},
               "fwd_bwd": {"estimate_ms": 20.0, "compile_s": 100.0}}
    estimate_lib._repeat_compiles(results, 4, measure)
    # estimate compiled step, bare; then bare, step | step, bare | bare, step: each program as often first
    assert calls == ["bare", "step", "step", "bare", "bare", "step"]
    assert results["step"]["compile_cpu_s_runs"] == [322.0, 330.0, 290.0, 300.0]
    assert results["bare"]["compile_cpu_s_runs"] == [259.0, 260.0, 270.0, 280.0]
    assert "compile_s_runs" not in results["fwd_bwd"]
    assert estimate_lib.compile_time(results["step"], "compile_cpu_s") == 311.0  # (300 + 322) / 2
    assert estimate_lib.compile_time(results["bare"], "compile_s") == 270.0  # (265 + 275) / 2
    assert estimate_lib.compile_time(results["fwd_bwd"], "compile_s") == 100.0  # compiled once
    assert estimate_lib.pair_ratios(results["step"], results["bare"]) == pytest.approx(
        [322 / 259, 330 / 260, 290 / 270, 300 / 280])

    row = _variant("nfnet.py:F1", "tpu-v5p", 26.5, 26.7)
    row["programs"] = {name: {**row["programs"][name], **results[name]} for name in ("step", "bare")}
    row["compiled_in"] = estimate_lib.ALONE
    # 311 / 265 CPU s = 1.17x; pairs 1.24, 1.27, 1.07, 1.07: two of four above 1.1
    assert estimate_lib.compile_summary([row]).endswith(
        "above the 1.1× target: nfnet.py:F1 on tpu-v5p 1.17× (311 / 265 CPU s, medians of 4 compiles each, "
        "alternating; pairs 1.07× to 1.27×, 2 of 4 pairs above the target).")
    assert "316 (311) ×4 / 270 (265) ×4" in estimate_lib.markdown_table([row])  # wall (CPU) medians
    row["programs"]["step"]["compile_cpu_s_runs"] = [250.0, 262.0, 270.0, 281.0]
    assert estimate_lib.compile_summary([row]).endswith(
        "none is above the 1.1× target. Compiled repeatedly: nfnet.py:F1 on tpu-v5p 1.00× (266 / 265 CPU s, "
        "medians of 4 compiles each, alternating; pairs 0.97× to 1.01×, no pair above the target).")
    with pytest.raises(ValueError, match="measure_alone"):
        estimate_lib.estimate("nfnet.py:F1", "tpu-v5p", per_device_batch=None, remat="off", compile_repeats=2)


def test_the_table_goes_between_the_pages_markers_and_nowhere_else(tmp_path, capsys):
    rows, page = tmp_path / "rows.jsonl", tmp_path / "page.markdown"
    rows.write_text(json.dumps(_row("tpu-v3")) + "\n")
    start, end = generated_section.markers(estimate_lib.SECTION)
    start2, end2 = generated_section.markers(estimate_lib.DEEPMIND_SECTION)
    start3, end3 = generated_section.markers(estimate_lib.GOALS_SECTION)
    page.write_text(f"# Title\n{start3}\n{end3}\n{start}\nold table\n{end}\n\nbetween\n{start2}\nold\n{end2}\nafter\n")
    estimate_lib.main(["--table", str(rows), "--into", str(page)])
    text = page.read_text()
    table = estimate_lib.render(generated_section.read_json_lines(rows))
    comparison = estimate_lib.deepmind_comparison(generated_section.read_json_lines(rows))
    goals = estimate_lib.goals(generated_section.read_json_lines(rows))
    assert text == (f"# Title\n{start3}\n{goals}\n{end3}\n{start}\n{table}\n{end}\n\nbetween\n{start2}\n"
                    f"{comparison}\n{end2}\nafter\n")
    page.write_text("no markers")
    with pytest.raises(SystemExit):
        estimate_lib.main(["--table", str(rows), "--into", str(page)])
    assert "markers" in capsys.readouterr().err and page.read_text() == "no markers"


def test_the_docs_page_shows_the_table_of_its_json_lines():
    docs = pathlib.Path(REPO_ROOT) / "docs"
    rows = generated_section.read_json_lines(docs / "tpu_step_cost.jsonl")
    assert rows and {"nfnet.py:F0"} <= {row["config"] for row in rows}
    page = (docs / "tpu_step_cost.md").read_text(encoding="utf-8")
    for name, text in estimate_lib.render_sections(rows).items():
        assert generated_section.section(page, name) == text
    assert any(estimate_lib.is_deepmind(row) for row in rows)


@pytest.mark.slow
def test_the_bare_step_is_the_runners_step_without_its_extras():
    """Independent of the benchmark's code: one step of each from the same state and batch gives the
    same params, optimizer state and EMA (the digits NFNet without dropout, so no RNG is drawn and
    the runner's key folding cannot matter; its device mean over one device is the identity)."""
    config = memory_plan.load_config("digits.py")
    config.model.kwargs.drop_rate = 0.0
    step = one_device_step.build(config, 8)
    programs = estimate_lib.build_programs(step)
    state, batch = jax.jit(step.init_state)(), step.random_batch()
    copy = lambda tree: jax.tree.map(np.array, tree)
    runner_state, _ = step.train(jax.tree.map(jax.numpy.array, copy(state)), batch)
    bare_state, no_metrics = programs["bare"][0](jax.tree.map(jax.numpy.array, copy(state)), batch)
    for name in ("params", "opt_state", "ema_params"):
        want, got = copy(getattr(runner_state, name)), copy(getattr(bare_state, name))
        assert jax.tree.structure(want) == jax.tree.structure(got)
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=name)
    assert int(bare_state.step) == int(runner_state.step) == 1 and no_metrics == {}


@pytest.mark.slow
@NEEDS_LIBTPU
def test_every_program_is_compiled_for_the_tpu_and_the_runner_costs_at_least_the_bare_step():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.tpu_step_estimate", "--only", "digits.py",
                             "--targets", "tpu-v3", "--per_device_batch", "16"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["device"] == "TPU v3" and row["estimate_valid"]
    assert row["compiled_in"] == estimate_lib.ALONE  # each program cold, in a process of its own
    # Compiled for a TPU from this CPU host: the TPU's choices, not the CPU's.
    assert row["choices"]["grouped_convs_as"] == "xla" and row["choices"]["activation_backward"] == "XLA's choice"
    assert (row["choices"]["weight_standardisation_statistics"]
            == "over the kernel's axes, pinned to the parameters' layout")
    programs = row["programs"]
    ms = {name: programs[name]["estimate_ms"] for name in estimate_lib.PROGRAMS}
    assert ms["forward"] < ms["fwd_bwd"] < ms["bare"] <= ms["step_state"] <= ms["step"]
    # The backward pass does about twice the forward's convolution FLOPs.
    assert 2.5 < programs["fwd_bwd"]["flops"] / programs["forward"]["flops"] < 3.5
    assert row["runner_over_bare"]["ratio"] == pytest.approx(ms["step"] / ms["bare"])
