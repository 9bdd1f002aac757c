"""The AGC λ × batch-size study command (paper §4.1, Figures 2 and 7; experiments/agc_study.py).

`plan`: every printed command is re-read here the way experiments/train.py would read it, by
loading the config file with the command's colon argument, and the batch size, λ, depth and seed
it names must land in the config. `collect`: synthetic workdirs with known final evaluations (a
missing run, an unfinished run, a diverged-looking point) must give the paper's aggregate — the
mean of the best 4 of 5 seeds — recomputed here by hand, and the three output files.
"""

import importlib.util
import json
import math
import os
import pathlib
import shlex

import numpy as np
import pytest

from experiments import agc_study as command
from nfnets_jax.analysis import agc_study

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 100


def _load_config(spec: str):
    """`configs/x.py:arg` -> get_config(arg), loaded by path like ml_collections' config flag."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("test_agc_study_config", REPO_ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def _flags(command_line: str) -> dict[str, str]:
    words = shlex.split(command_line)
    assert words[:3] == ["python", "-m", "experiments.train"]
    return dict(word[2:].split("=", 1) for word in words[3:])


def test_plan_commands_load_the_real_configs(tmp_path, capsys):
    root = str(tmp_path / "agc")
    command.main(["plan", f"--root={root}", "--depths=50,200", "--batches=256,4096",
                  "--clippings=0.01,0.16", "--seeds=2", "--extra_flags=--config.eval.every_steps=0"])
    printed = capsys.readouterr().out.strip().splitlines()
    with open(os.path.join(root, "plan.json"), encoding="utf-8") as f:
        plan = json.load(f)
    assert [run["command"] for run in plan["runs"]] == printed
    # 2 depths x 2 batches x (2 λ + no AGC + BN) x 2 seeds
    assert len(printed) == 2 * 2 * 4 * 2
    expected = {(model, depth, batch, clipping, seed)
                for depth in (50, 200) for batch in (256, 4096) for seed in (0, 1)
                for model, clipping in (("nf", 0.01), ("nf", 0.16), ("nf", 0.0), ("bn", None))}
    seen = set()
    for line in printed:
        flags = _flags(line)
        config = _load_config(flags.pop("config"))
        for name, value in flags.items():  # the --config.* overrides, by hand
            if name.startswith("config."):
                *parents, leaf = name.split(".")[1:]
                node = config
                for parent in parents:
                    node = node[parent]
                node[leaf] = type(node[leaf])(value)
        workdir = os.path.basename(flags["workdir"])
        assert os.path.dirname(flags["workdir"]) == root
        seed = config.train.seed
        assert workdir.endswith(f"_s{seed}")
        assert config.eval.every_steps == 0
        if workdir.startswith("bn_"):
            depth = int(config.model.name.removeprefix("bn_resnet"))
            assert config.optimizer.agc.clipping is None
            key = ("bn", depth, config.train.batch_size, None, seed)
        else:
            depth = int(config.model.name.removeprefix("nf_resnet"))
            clipping = config.optimizer.agc.clipping or 0.0
            assert workdir == f"d{depth}_b{config.train.batch_size}_c{clipping:g}_s{seed}"
            key = ("nf", depth, config.train.batch_size, clipping, seed)
        assert config.optimizer.lr_scale_by_batch and config.optimizer.lr == 0.1  # 0.1 per 256
        seen.add(key)
    assert seen == expected


def test_default_plan_is_the_paper_grid(tmp_path):
    plan = command.make_plan(str(tmp_path), depths=[50, 200], batches=[256, 512, 1024, 2048, 4096],
                             clippings=[0.01, 0.02, 0.04, 0.08, 0.16], seeds=5,
                             baselines=["no_agc", "bn"], extra_flags=[])
    assert len(plan["runs"]) == 2 * 5 * (5 + 1 + 1) * 5


@pytest.mark.parametrize("flag, message", [
    ("--depths=101", "the study used 50 and 200"),
    ("--clippings=0.03", "off the paper's grid"),
    ("--batches=100", "off the paper's grid"),
    ("--extra_flags=--config.train.sed=1", "does not parse"),
    ("--extra_flags=--config.train.seed=3", "set by the plan"),
    ("--extra_flags=--no_such_flag", "has no flag"),
    ("--baselines=fixup", "unknown"),
])
def test_plan_rejects_bad_arguments_at_the_door(tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as raised:
        command.main(["plan", f"--root={tmp_path}", "--depths=50", "--batches=256", "--seeds=1", flag])
    assert raised.value.code == 1  # one `error:` line, as every program of the project
    assert message in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


def test_aggregate_seeds_is_the_best_n_minus_1_mean():
    assert agc_study.aggregate_seeds([0.70, 0.76, 0.75, 0.10, 0.74]) == (
        pytest.approx((0.70 + 0.76 + 0.75 + 0.74) / 4), [0.76, 0.75, 0.74, 0.70])
    assert agc_study.aggregate_seeds([0.5, 0.7, 0.6])[0] == pytest.approx(0.65)
    assert agc_study.aggregate_seeds([0.5, 0.7])[0] == pytest.approx(0.6)
    assert agc_study.aggregate_seeds([0.5])[0] == 0.5
    assert agc_study.aggregate_seeds([0.5, float("nan"), 0.7])[0] == pytest.approx(0.6)
    assert math.isnan(agc_study.aggregate_seeds([])[0])


def _write_run(workdir, final, *, ema=None, last_step=TOTAL_STEPS, eval_every=50, torn=False):
    """A metrics.jsonl as nfnets_jax/train/loop.py writes it: train records every 25 steps, a
    mid-run eval every `eval_every` steps (worse than the final one), the final eval last."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"eval": {"every_steps": eval_every}}, f)
    lines = []
    for step in range(25, last_step + 1, 25):
        lines.append({"step": step, "split": "train", "loss": 2.0 - step / 100, "top_1_acc": 0.5})
        if step % eval_every == 0 and step != TOTAL_STEPS:
            lines.append({"step": step, "split": "eval", "top_1_acc": final - 0.2, "num_examples": 50000.0})
    if last_step == TOTAL_STEPS:
        record = {"step": TOTAL_STEPS, "split": "eval", "top_1_acc": final, "loss": 1.0, "num_examples": 50000.0}
        if ema is not None:
            record["ema_top_1_acc"] = ema
        lines.append(record)
    with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        if torn:
            f.write('{"step": 101, "split": "tra')


def test_collect_aggregates_synthetic_runs(tmp_path, capsys):
    root, out = str(tmp_path / "agc"), str(tmp_path / "results")
    command.main(["plan", f"--root={root}", "--depths=50,200", "--batches=256,1024",
                  "--clippings=0.01,0.04", "--seeds=5"])
    capsys.readouterr()
    plan_path = os.path.join(root, "plan.json")
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    for run in plan["runs"]:  # as if planned where the dataset is readable
        run["total_steps"] = TOTAL_STEPS
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump(plan, f)

    rng = np.random.default_rng(0)
    missing, unfinished = "d50_b1024_c0.04_s2", "d200_b256_c0_s4"
    expected: dict[tuple, list[float]] = {}  # (depth, batch, series) -> finished seeds' final top-1
    expected_ema: dict[tuple, list[float]] = {}
    for run in plan["runs"]:
        series = "BN" if run["model"] == "bn" else ("no AGC" if not run["clipping"] else f"λ={run['clipping']:g}")
        accuracy = float(0.70 + 0.05 * rng.random())
        if run["name"].startswith("d50_b1024_c0_"):
            accuracy = float(0.001 + 0.001 * rng.random())  # "diverged": below the plotted range
        ema = None if run["model"] == "bn" else accuracy + 0.002
        if run["name"] == missing:
            continue
        if run["name"] == unfinished:
            _write_run(run["workdir"], accuracy, ema=ema, last_step=75)
            continue
        _write_run(run["workdir"], accuracy, ema=ema, torn=run["seed"] == 1)
        key = (run["depth"], run["batch"], series)
        expected.setdefault(key, []).append(accuracy)
        if ema is not None:
            expected_ema.setdefault(key, []).append(ema)
    os.makedirs(os.path.join(root, "not_a_run"))  # ignored

    command.main(["collect", f"--root={root}", f"--out={out}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["runs"], summary["finished"], summary["unfinished"], summary["missing"]) == (80, 78, 1, 1)
    assert summary["not_finished"] == {missing: "missing", unfinished: "unfinished at step 75"}

    with open(summary["json"], encoding="utf-8") as f:
        table = json.load(f)
    rows = {(r["depth"], r["batch"], r["series"]): r for r in table["rows"]}
    assert set(rows) == set(expected)
    for key, values in expected.items():
        by_hand = sorted(values, reverse=True)[:len(values) - 1]  # 5 seeds: best 4; 4 seeds: best 3
        assert len(values) == (4 if key in {(50, 1024, "λ=0.04"), (200, 256, "no AGC")} else 5)
        assert rows[key]["top_1_acc"]["mean"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-12)
        assert rows[key]["top_1_acc"]["n_kept"] == len(by_hand)
        if key in expected_ema:
            ema_by_hand = sorted(expected_ema[key], reverse=True)[:-1]
            assert rows[key]["ema_top_1_acc"]["mean"] == pytest.approx(np.mean(ema_by_hand), abs=1e-12)
        else:
            assert "ema_top_1_acc" not in rows[key]
    assert rows[(50, 1024, "λ=0.04")]["seeds_not_finished"] == {"2": "missing"}

    best = {}
    for (depth, batch, series), values in expected.items():
        if series.startswith("λ"):
            mean = np.mean(sorted(values)[1:])
            if mean > best.get((depth, batch), (None, -1.0))[1]:
                best[(depth, batch)] = (float(series[2:]), mean)
    assert summary["best_clipping"] == {f"resnet{d}_b{b}": c for (d, b), (c, _) in sorted(best.items())}

    markdown = pathlib.Path(summary["markdown"]).read_text(encoding="utf-8")
    cell = 100 * rows[(50, 1024, "λ=0.04")]["top_1_acc"]["mean"]
    assert f"{cell:.2f} (4/5)" in markdown
    assert "**ResNet-50**" in markdown and "**ResNet-200**" in markdown
    assert "| batch | λ=0.01 | λ=0.04 | no AGC | BN |" in markdown
    with open(summary["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(summary["png"]) > 20_000


def test_read_run_without_total_steps(tmp_path):
    point = agc_study.StudyPoint("nf", 50, 256, 0.01)
    _write_run(tmp_path / "final", 0.75, eval_every=40)  # final eval at 100, not a multiple of 40
    result = agc_study.read_run(str(tmp_path / "final"), point, 0)
    assert (result.status, result.metrics, result.note) == ("finished", {"top_1_acc": 0.75}, "")
    _write_run(tmp_path / "ambiguous", 0.75, eval_every=50)  # 100 is also a mid-run eval step
    result = agc_study.read_run(str(tmp_path / "ambiguous"), point, 0)
    assert result.status == "finished" and "taken as final" in result.note
    _write_run(tmp_path / "stopped", 0.75, last_step=75, eval_every=50)  # last eval at 50 < 75
    assert agc_study.read_run(str(tmp_path / "stopped"), point, 0).status == "unfinished"
    assert agc_study.read_run(str(tmp_path / "absent"), point, 0).status == "missing"


def test_run_names_round_trip():
    for point in (agc_study.StudyPoint("nf", 200, 4096, 0.01), agc_study.StudyPoint("nf", 50, 256, 0.0),
                  agc_study.StudyPoint("bn", 50, 1024, None)):
        assert agc_study.parse_run_name(agc_study.run_name(point, 3)) == (point, 3)
    assert agc_study.parse_run_name("digits") is None
