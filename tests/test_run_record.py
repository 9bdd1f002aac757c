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
