"""docs/memory_plan.md is rendered from the command's records, and its verdicts follow from the sizes."""

import json
import pathlib

import pytest

from experiments import generated_section, memory_plan, memory_plan_page

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _record(config, remat, *, peak=None, temp=None, state=1.0, gflops=None, refused=None, at_least=None,
            batch=32, target="tpu-v3", date="2026-12-06"):
    """A record as `memory_plan --json` writes it (the fields the page reads)."""
    return {"config": config, "model": "m", "image_size": 192, "per_device_batch": batch,
            "compute_dtype": "bfloat16", "remat": remat, "argument_gib": None if refused else state,
            "output_gib": None if refused else state, "temp_gib": temp, "peak_gib": peak, "gflops": gflops,
            "compile_s": 100.0, "step_s": None, "compiled_for": "TPU v3", "out_of_memory": refused,
            "peak_at_least_gib": at_least, "target": target, "jax": "0.10.2", "libtpu": "0.0.42.1",
            "date": date}


REFUSAL = "RESOURCE_EXHAUSTED: the total memory required for HLO temporaries (20.00G) exceeds available HBM"


def _plan():
    return [
        _record("nfnet.py:F0", False, peak=2.0, temp=1.0, gflops=1000.0),
        _record("nfnet.py:F0", True, peak=1.5, temp=0.5, gflops=1300.0),
        _record("nfnet.py:F1", False, peak=14.4, temp=13.0, gflops=2000.0),  # exactly 90% of 16 GiB
        _record("nfnet.py:F1", True, peak=8.0, temp=6.5, gflops=2400.0),
        _record("nfnet.py:F2", False, peak=14.41, temp=13.0, gflops=3000.0),  # just over the headroom
        _record("nfnet.py:F2", True, peak=9.0, temp=6.5, gflops=3900.0),
        _record("nfnet.py:F4", False, temp=20.0, refused=REFUSAL, at_least=20.0),
        _record("nfnet.py:F4", True, peak=12.0, temp=8.0, gflops=3000.0),
        _record("nfnet.py:F7", False, temp=37.0, refused=REFUSAL, at_least=37.0),
        _record("nfnet.py:F7", True, temp=16.0, refused=REFUSAL, at_least=16.0),
        _record("nfnet.py:F7", True, peak=12.5, temp=7.0, gflops=4000.0, batch=16),
        _record("nfnet.py:F3", False, peak=11.0, temp=9.0, gflops=5000.0),
    ]


def test_a_later_record_of_the_same_compile_replaces_the_earlier():
    old = _record("nfnet.py:F0", False, peak=3.0, temp=2.0, date="2026-12-01")
    new = _record("nfnet.py:F0", False, peak=2.0, temp=1.0, date="2026-12-06")
    other_batch = _record("nfnet.py:F0", False, peak=1.0, temp=0.5, batch=16)
    compiles = memory_plan_page.latest([old, new, other_batch])
    assert compiles[("nfnet.py:F0", 32, "tpu-v3")] == {False: new}
    assert compiles[("nfnet.py:F0", 16, "tpu-v3")] == {False: other_batch}


def test_fits_is_the_peak_within_the_headroom_of_the_targets_device():
    # 16 GiB TPUv3 core, 10% headroom: 14.4 GiB fits, 14.41 does not; v5p's 95 GiB: 85.5 fits.
    assert memory_plan_page.fits(_record("c", False, peak=14.4), "tpu-v3") is True
    assert memory_plan_page.fits(_record("c", False, peak=14.41), "tpu-v3") is False
    assert memory_plan_page.fits(_record("c", False, peak=85.5), "tpu-v5p") is True
    assert memory_plan_page.fits(_record("c", False, refused=REFUSAL, at_least=20.0), "tpu-v3") is False
    assert memory_plan_page.fits(None, "tpu-v3") is None
    assert memory_plan_page.fits(_record("c", False, peak=1.0), memory_plan.HERE) is None  # device unknown


def test_each_line_joins_a_configs_two_compiles_and_says_what_a_refusal_proves():
    table = memory_plan_page.markdown_table(memory_plan_page.latest(_plan())).splitlines()
    assert len({line.count("|") for line in table}) == 1
    rows = {line.split(" | ")[0] + "@" + line.split(" | ")[3]: line for line in table[2:]}
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| nfnet.py:F0", "| nfnet.py:F1", "| nfnet.py:F2", "| nfnet.py:F3", "| nfnet.py:F4", "| nfnet.py:F7",
        "| nfnet.py:F7"]  # the plan's order, the recipe's batch first
    assert "| 1.00 → 0.50 | **2.00 → 1.50** | 1.0 → 1.3 | yes / yes |" in rows["| nfnet.py:F0@32"]
    assert "| ≥ 20.00 (refused) → 8.00 | **does not fit (> 20.00) → 12.00** | — → 3.0 | no / yes |" in (
        rows["| nfnet.py:F4@32"])
    assert "**does not fit (> 37.00) → does not fit (> 16.00)** | — → — | no / no |" in rows["| nfnet.py:F7@32"]
    assert "| (not compiled) → 7.00 | **— → 12.50** |" in rows["| nfnet.py:F7@16"]
    assert "| 9.00 → (not compiled) | **11.00 → —** | 5.0 → — | yes / — |" in rows["| nfnet.py:F3@32"]
    assert "2026-12-06, jax 0.10.2, libtpu 0.0.42.1" in rows["| nfnet.py:F0@32"]


def test_the_verdicts_follow_from_the_sizes():
    text = memory_plan_page.verdicts(memory_plan_page.latest(_plan()), "tpu-v3")
    assert text == ("At 32 images per TPUv3 core: F0–F1, F3 fit as they are; F2, F4 fit only with remat; "
                    "F7 does not fit even with remat. "
                    "At 16 images per TPUv3 core: F7 fits with remat (not compiled without).")


def test_a_config_compiled_only_without_remat_that_does_not_fit_is_not_judged():
    compiles = memory_plan_page.latest([_record("nfnet.py:F5", False, temp=20.0, refused=REFUSAL, at_least=20.0)])
    assert "F5 is not judged yet" in memory_plan_page.verdicts(compiles, "tpu-v3")


def test_what_remat_saves_is_the_range_over_configs_with_both_compiles_on_one_target():
    cpu = [dict(_record("nfnet.py:F0", remat, peak=9.0, temp=temp, gflops=1000.0, target=memory_plan.HERE),
                compiled_for="cpu") for remat, temp in ((False, 4.0), (True, 4.2))]
    compiles = memory_plan_page.latest(_plan() + cpu)
    text = memory_plan_page.remat_effect(compiles, "tpu-v3")
    # temporaries on/off: F0 0.5/1.0, F1 6.5/13.0, F2 6.5/13.0 → 0.50; FLOPs: +30%, +20%, +30%.
    assert text.startswith("On tpu-v3, where both compiles succeeded (3 configs), remat cut the temporaries to "
                           "0.50× of those without it, for +20% to +30% step FLOPs")
    # The CPU's compiles stay apart, and a growth is not called a cut (4.2 / 4.0 = 1.05×).
    assert memory_plan_page.remat_effect(compiles, "cpu").startswith(
        "On cpu, where both compiles succeeded (1 config), remat changed the temporaries to 1.05×")


def test_records_of_the_local_backend_are_kept_apart_per_device_and_never_judged():
    cpu = dict(_record("nfnet.py:F0", False, peak=9.0, temp=4.0, target=memory_plan.HERE), compiled_for="cpu")
    gpu = dict(_record("nfnet.py:F0", True, peak=2.0, temp=1.0, target=memory_plan.HERE), compiled_for="NVIDIA H200")
    compiles = memory_plan_page.latest([cpu, gpu])
    assert set(compiles) == {("nfnet.py:F0", 32, "cpu"), ("nfnet.py:F0", 32, "NVIDIA H200")}
    table = memory_plan_page.markdown_table(compiles)
    assert "| nfnet.py:F0 | cpu |" in table and "| nfnet.py:F0 | NVIDIA H200 |" in table
    assert "libtpu" not in table and "yes" not in table  # no TPU compiler, no device memory to judge by


def test_a_section_names_the_plans_configs_it_has_no_record_of():
    rendered = memory_plan_page.sections(_plan())
    assert rendered["nfnet"].endswith("Not compiled yet: F5–F6.")
    assert rendered["nfnet_plus"].startswith("No records yet") and "F0+–F7+" in rendered["nfnet_plus"]


def test_a_record_without_what_the_page_reads_is_one_error_naming_it():
    broken = _record("nfnet.py:F1", False, peak=None, temp=1.0)  # compiled, but no peak
    with pytest.raises(ValueError, match=r"record 2 \(nfnet.py:F1\) has no peak_gib"):
        memory_plan_page.sections([_plan()[0], broken])


def test_every_section_shows_only_its_configs():
    records = _plan() + [_record("nfnet.py:F0+", False, peak=3.0, temp=2.0),
                         _record("nf_regnet.py:B0", False, peak=2.0, temp=1.5, batch=128)]
    rendered = memory_plan_page.sections(records)
    assert set(rendered) == set(memory_plan_page.SECTIONS)
    assert "nfnet.py:F0+" in rendered["nfnet_plus"] and "nfnet.py:F0+" not in rendered["nfnet"]
    assert "nf_regnet.py:B0" in rendered["nf_resnet_regnet"] and "NF-RegNet-B0 fits as it is" in (
        rendered["nf_resnet_regnet"])
    assert "nf_regnet" not in rendered["nfnet"]


def test_the_command_prints_or_writes_the_sections_and_leaves_a_page_without_markers_alone(tmp_path, capsys):
    records, page = tmp_path / "plan.jsonl", tmp_path / "page.markdown"
    records.write_text("# the command's header line\n" + "\n".join(json.dumps(r) for r in _plan()) + "\n")
    memory_plan.main(["--table", str(records)])
    assert "F2, F4 fit only with remat" in capsys.readouterr().out
    blocks = "".join(f"{generated_section.markers(name)[0]}\nold\n{generated_section.markers(name)[1]}\n"
                     for name in memory_plan_page.SECTIONS)
    page.write_text(f"# Title\n\n{blocks}\nafter\n")
    memory_plan.main(["--table", str(records), "--into", str(page)])
    written = page.read_text()
    for name, text in memory_plan_page.sections(generated_section.read_json_lines(records)).items():
        assert generated_section.section(written, name) == text
    assert written.startswith("# Title\n") and written.endswith("\nafter\n") and "\nold\n" not in written
    partial = f"# Title\n\n{generated_section.markers('nfnet')[0]}\nold\n{generated_section.markers('nfnet')[1]}\n"
    page.write_text(partial)
    with pytest.raises(SystemExit):
        memory_plan.main(["--table", str(records), "--into", str(page)])
    assert "markers" in capsys.readouterr().err and page.read_text() == partial
    with pytest.raises(SystemExit):
        memory_plan.main(["--into", str(page)])
    assert "pass --table too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory_plan.main(["--table", str(records), "--only", "nfnet.py:F0"])
    assert "compiles nothing: drop --only" in capsys.readouterr().err
    for bad in (tmp_path / "missing.jsonl", tmp_path / "broken.jsonl"):
        if bad.name == "broken.jsonl":
            bad.write_text('{"config": "nfnet.py:F0"}\n')  # a record without its sizes
        with pytest.raises(SystemExit):
            memory_plan.main(["--table", str(bad), "--into", str(page)])
        assert "cannot read its records" in capsys.readouterr().err and page.read_text() == partial


def test_the_docs_page_shows_what_its_records_render_to():
    records = generated_section.read_json_lines(REPO_ROOT / "docs" / "memory_plan.jsonl")
    assert records and all(record["date"] and record["jax"] for record in records)
    page = (REPO_ROOT / "docs" / "memory_plan.md").read_text(encoding="utf-8")
    for name, text in memory_plan_page.sections(records).items():
        assert generated_section.section(page, name) == text, f"re-render the page: section {name}"


def test_consecutive_configs_are_said_as_a_range():
    assert memory_plan_page._ranges(["F0", "F1", "F2", "F4"]) == "F0–F2, F4"
    assert memory_plan_page._ranges(["F0+", "F1+", "F3"]) == "F0+–F1+, F3"
    assert memory_plan_page._ranges(["NF-RegNet-B0", "NF-RegNet-B1", "NF-RegNet-B2"]) == "NF-RegNet-B0–B2"
    assert memory_plan_page._ranges(["NF-ResNet-50", "NF-ResNet-101"]) == "NF-ResNet-50, NF-ResNet-101"
