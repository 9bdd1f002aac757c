"""The training loop with a fake model: what a run leaves in its workdir and prints.

The expected eval numbers are recomputed with NumPy from the checkpointed params.
"""

import glob
import io
import json
import os

import numpy as np
import pytest

import fakes  # tests/fakes.py
from nfnets_jax.train import checkpointing, loop, metrics_logging


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = fakes.fake_config(**{"train.steps": 4, "eval.every_steps": 2, "checkpoint.every_steps": 2})
    data = fakes.FakeData(num_classes=6)
    summary = loop.run(fakes.fake_experiment(config, data), workdir)
    return workdir, summary, data


@pytest.mark.slow
def test_metrics_file_has_every_train_and_eval_scalar(finished_run):
    workdir, summary, _ = finished_run
    records = metrics_logging.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for name in ("loss", "top_1_acc", "learning_rate", "grad_norm", "agc/clip_fraction",
                 "agc/clip_fraction/head", "step_time", "images_per_second"):
        assert all(np.isfinite(r[name]) for r in train), name
    assert [r["step"] for r in evals] == [2, 4]
    for name in ("top_1_acc", "top_5_acc", "loss", "ema_top_1_acc", "ema_top_5_acc", "ema_loss"):
        assert name in evals[-1]
    assert summary.stopped_by == "completed" and summary.step == 4


@pytest.mark.slow
def test_tensorboard_events_and_curve_plot_are_written(finished_run):
    workdir, summary, _ = finished_run
    assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
    assert summary.plot_file == os.path.join(workdir, metrics_logging.CURVES_FILE)
    with open(summary.plot_file, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_final_eval_matches_numpy_on_the_checkpointed_params(finished_run):
    workdir, summary, data = finished_run
    saved = checkpointing.read_workdir_state(workdir)
    assert saved["step"] == 4
    images, labels = data.eval_arrays()
    for prefix, params in (("", saved["params"]), ("ema_", saved["ema_params"])):
        linear = params["fake_net/~/linear"]
        logits = images.reshape(len(labels), -1).astype(np.float64) @ linear["w"] + linear["b"]
        expected = np.mean(np.argmax(logits, axis=1) == labels)
        np.testing.assert_allclose(summary.eval_metrics[prefix + "top_1_acc"], expected, rtol=1e-6)


@pytest.mark.slow
def test_plain_progress_lines_and_parameter_groups_when_not_a_tty(tmp_path, capsys):
    config = fakes.fake_config(**{"train.steps": 2, "log.every_steps": 1})
    loop.run(fakes.fake_experiment(config, fakes.FakeData()), str(tmp_path))
    out = capsys.readouterr().out
    assert "step 1/2  loss" in out and "step 2/2  loss" in out and "img/s" in out and "ETA" in out
    assert "fake_net/~/linear/w" in out or "fake_net/linear/w" in out  # the parameter-group table
    assert "\r" not in out


def test_progress_is_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = metrics_logging.Progress(10, 0, is_main=True, stream=stream)
    progress.update(5, loss=0.5, images_per_second=100.0, seconds_per_step=1.0)
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "5/10" in text and "loss 0.5000" in text and "ETA 5s" in text


def test_format_duration():
    assert metrics_logging.format_duration(3725) == "1h02m05s"
    assert metrics_logging.format_duration(65) == "1m05s"
    assert metrics_logging.format_duration(float("inf")) == "?"


@pytest.mark.slow
def test_jsonl_records_are_one_json_object_per_line(finished_run):
    workdir, _, _ = finished_run
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            assert isinstance(json.loads(line), dict)


def test_step_time_leaves_out_evaluations_and_checkpoint_saves(monkeypatch):
    # Regression: the interval after an eval counted the eval's duration as training steps, so
    # the logged step time, images/s and the ETA were off after every eval.
    clock = [0.0]
    monkeypatch.setattr(metrics_logging.time, "perf_counter", lambda: clock[0])
    timer = metrics_logging.StepTimer(global_batch_size=10)
    for _ in range(4):
        clock[0] += 0.5
        timer.tick()
    with timer.paused():
        clock[0] += 100.0  # an evaluation
    assert timer.read_and_reset() == (0.5, 20.0)
