"""experiments.run_record: the JSON a docs page quotes is what the workdir's files say."""

import importlib.util
import json
import pathlib

import pytest

from experiments import run_record

DIGITS_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py"


def _workdir(tmp_path):
    """A workdir as experiments.train leaves it, for the digits config, with made-up metrics."""
    spec = importlib.util.spec_from_file_location("digits_config", DIGITS_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    (tmp_path / "provenance.json").write_text(json.dumps(
        {"versions": {"jax": "9.9"}, "argv": ["/x/experiments/train.py", "--workdir=/w"]}))
    records = [
        {"step": 10, "split": "train", "step_time": 0.5, "loss": 2.0},
        {"step": 30, "split": "train", "step_time": 0.25, "loss": 1.0},
        {"step": 30, "split": "eval", "top_1_acc": 0.5, "ema_top_1_acc": 0.25, "num_examples": 360.0},
        {"step": 40, "split": "train", "step_time": 1.0, "loss": 0.5},
        {"step": 40, "split": "eval", "top_1_acc": 0.75, "ema_top_1_acc": 0.875, "top_5_acc": 1.0,
         "num_examples": 360.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return config


@pytest.mark.slow  # loads the digits and traces the model (~5 s on 2 loaded cores)
def test_record_quotes_the_last_evaluation_and_sums_step_times(tmp_path):
    config = _workdir(tmp_path)
    record = run_record.run_record(str(tmp_path), wall_seconds=123.0)
    assert record["command"] == "python -m experiments.train --workdir=/w"
    assert record["final"] == {"step": 40, "top_1_acc": 0.75, "ema_top_1_acc": 0.875,
                               "top_5_acc": 1.0, "num_examples": 360.0}
    assert record["evals"] == [{"step": 30, "top_1_acc": 0.5, "ema_top_1_acc": 0.25},
                               {"step": 40, "top_1_acc": 0.75, "ema_top_1_acc": 0.875}]
    assert record["train_step_seconds"] == 10 * 0.5 + 20 * 0.25 + 10 * 1.0
    assert record["wall_seconds"] == 123.0 and record["provenance"]["versions"] == {"jax": "9.9"}
    assert record["model"]["kwargs"]["widths"] == list(config.model.kwargs.widths)
    assert record["model"]["float32_megabytes"] == round(record["model"]["params"] * 4 / 2**20, 2)


def test_a_run_without_an_evaluation_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train"}) + "\n")
    with pytest.raises(ValueError, match="no evaluation yet"):
        run_record.run_record(str(tmp_path))


def _record(ema, raw, *, target=0.93, steps=300, epochs=30.0, commit="0123456789", dirty=False):
    return {
        "command": "python -m experiments.train --config=configs/x.py",
        "model": {"name": "nfnet_f0", "kwargs": {"depths": [1, 1], "widths": [8, 16]}, "params": 1234567,
                  "macs_per_image": 2_500_000},
        "data": {"image_size": 40},
        "train": {"batch_size": 128, "epochs": epochs, "steps": steps},
        "final": {"step": steps, "top_1_acc": raw, "ema_top_1_acc": ema, "num_examples": 10000.0},
        "evals": [{"step": 100, "top_1_acc": 0.5, "ema_top_1_acc": 0.25}, {"step": steps, "top_1_acc": raw,
                                                                             "ema_top_1_acc": ema}],
        "train_step_seconds": 600.0, "wall_seconds": 900.0, "target_top_1": target,
        "provenance": {"git": {"commit": commit, "dirty": dirty}, "versions": {"jax": "9.9"},
                       "machine": {"cpu_count": 2, "machine": "x86_64", "python": "3.11"}},
    }


def test_the_rendered_section_says_whether_the_target_is_met_with_the_gap_in_points():
    short = run_record.render_runs([_record(0.9243, 0.9241)])
    assert "**Test top-1 92.43%** (EMA parameters; raw 92.41%)" in short
    assert "is **not met**: 0.57 points short" in short  # 93 - 92.43
    met = run_record.render_runs([_record(0.9312, 0.93)])
    assert "is met (by 0.12 points)" in met
    assert "not met" not in run_record.render_runs([_record(0.93, 0.93)])  # the target is inclusive
    assert "target" not in run_record.render_runs([_record(0.9, 0.9, target=None)]).split("\n\n")[2]


def test_the_rendered_section_converts_steps_to_epochs_and_lists_every_run():
    text = run_record.render_runs([_record(0.9, 0.8), _record(0.7, 0.6, commit="abcdef0123", dirty=True)],
                                  curves="x.png")
    assert "| 10.0 | 100 | 25.00% | 50.00% |" in text  # step 100 of 300 in 30 epochs
    assert "| 30.0 | 300 | 90.00% | 80.00% |" in text
    assert "![Training curves of the run shown](x.png)" in text
    assert "Wall time 15 min, of which 10 min in train steps" in text
    rows = [line for line in text.splitlines() if line.startswith("| commit")]
    assert rows[0].startswith("| commit 0123456 | nfnet_f0: depths 1-1, widths 8-16 | 1,234,567 | 2.5 M | 40 | 30 |")
    assert rows[1].startswith("| commit abcdef0 (uncommitted changes) |") and "| 70.00% | 60.00% |" in rows[1]


def test_a_page_is_rendered_between_its_markers_and_names_its_records(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.json").write_text(json.dumps(_record(0.9, 0.8)))
    (results / "a.png").write_bytes(b"png")
    page = tmp_path / "page.markdown"
    page.write_text("# Title\n\nbefore\n<!-- generated: runs start -->\nold\n<!-- generated: runs end -->\nafter\n")
    monkeypatch.chdir(tmp_path)
    run_record.main(["--page=page.markdown", "--records=results/a.json"])
    text = page.read_text()
    assert text.startswith("# Title\n\nbefore\n<!-- generated: runs start -->\n<!-- rendered from: results/a.json -->\n")
    assert text.endswith("<!-- generated: runs end -->\nafter\n") and "old" not in text
    assert "![Training curves of the run shown](results/a.png)" in text
    page.write_text("no markers")
    with pytest.raises(SystemExit):
        run_record.main(["--page=page.markdown", "--records=results/a.json"])
    assert page.read_text() == "no markers"
