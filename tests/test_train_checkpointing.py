"""Checkpoints: keep the last K, resume bit-exactly (also after a real SIGTERM), never save a
non-finite state.

The reference for every resume test is an uninterrupted run of the same config: a resumed run
must reach bit-identical params, optimizer state, EMA and step.

Run as a script (`python tests/test_train_checkpointing.py WORKDIR STEPS SLEEP`), this file is
the child process of the SIGTERM test: a fake-model training run whose data arrives slowly.
"""

import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

import fakes  # tests/fakes.py
from nfnets_jax.train import checkpointing, loop, metrics_logging

pytestmark = pytest.mark.slow  # end-to-end training runs (pytest.ini)

TOTAL_STEPS = 12
SIGTERM_STEPS = 40


def _config(steps=TOTAL_STEPS, **overrides):
    return fakes.fake_config(**{"train.steps": steps, "checkpoint.every_steps": 4, "checkpoint.keep": 2,
                                **overrides})


class _SlowData(fakes.FakeData):
    """FakeData whose batches take `sleep` seconds each, so a signal can land mid-run."""

    def __init__(self, sleep: float = 0.0, nan_at_step: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sleep = sleep
        self.nan_at_step = nan_at_step

    def train_batches(self, start_step, *, global_batch_size):
        for step, batch in enumerate(super().train_batches(start_step, global_batch_size=global_batch_size),
                                     start=start_step + 1):
            time.sleep(self.sleep)
            if step == self.nan_at_step:
                batch["images"][0, 0, 0, 0, 0] = np.nan
            yield batch


def _run(workdir, steps=TOTAL_STEPS, data=None, **overrides):
    config = _config(steps, **overrides)
    data = data or _SlowData()
    return loop.run(fakes.fake_experiment(config, data, drop_rate=0.2), str(workdir), prefetch=1)


def _final_state(workdir):
    return checkpointing.read_workdir_state(str(workdir))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = _run(workdir)
    return workdir, summary


def test_keeps_only_the_last_k_checkpoints(uninterrupted):
    workdir, summary = uninterrupted
    assert sorted(int(name) for name in os.listdir(summary.checkpoint_dir) if name.isdigit()) == [8, 12]


def test_resume_after_preemption_is_bit_exact(tmp_path, uninterrupted, monkeypatch):
    # Preempt at step 6 (between two periodic saves), then restart in the same workdir.
    monkeypatch.setattr(checkpointing.PreemptionWatcher, "should_stop", lambda self, step: step == 6)
    first = _run(tmp_path)
    assert first.stopped_by == "preempted" and first.step == 6
    monkeypatch.undo()
    second = _run(tmp_path)
    assert second.stopped_by == "completed" and second.step == TOTAL_STEPS
    resumed, reference = _final_state(tmp_path), _final_state(uninterrupted[0])
    assert resumed["step"] == reference["step"] == TOTAL_STEPS
    chex.assert_trees_all_equal(resumed["params"], reference["params"])
    chex.assert_trees_all_equal(resumed["ema_params"], reference["ema_params"])
    # The metrics of the resumed run continue the step count without a gap.
    steps = [r["step"] for r in metrics_logging.read_metrics(second.metrics_file) if r["split"] == "train"]
    assert steps == list(range(1, TOTAL_STEPS + 1))


def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    data = _SlowData(nan_at_step=7)
    with pytest.raises(loop.NonFiniteError, match=r"step 7\b.*last good checkpoint: step 4"):
        _run(tmp_path, data=data)
    saved = _final_state(tmp_path)
    assert saved["step"] == 4
    assert all(np.all(np.isfinite(x)) for x in (saved["params"]["fake_net/~/linear"]["w"],))
    # The curves up to the bad step are drawn even though the run stopped with an error.
    assert (tmp_path / metrics_logging.CURVES_FILE).is_file()


def test_non_finite_step_is_skipped_when_configured(tmp_path, uninterrupted):
    summary = _run(tmp_path, data=_SlowData(nan_at_step=7), nonfinite="skip")
    assert summary.stopped_by == "completed" and summary.skipped_steps == 1
    saved = _final_state(tmp_path)
    assert np.all(np.isfinite(saved["params"]["fake_net/~/linear"]["w"]))
    # Skipping changed the trajectory: not the uninterrupted run's params.
    assert not np.array_equal(saved["params"]["fake_net/~/linear"]["w"],
                              _final_state(uninterrupted[0])["params"]["fake_net/~/linear"]["w"])


def test_sigterm_to_a_training_process_saves_exits_cleanly_and_resumes_bit_exactly(tmp_path):
    workdir = tmp_path / "run"
    reference_dir = tmp_path / "reference"
    child = [sys.executable, os.path.abspath(__file__), str(workdir), str(SIGTERM_STEPS)]
    process = subprocess.Popen(child + ["0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = workdir / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[0]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "SIGTERM: saved step" in output
    stopped_at = _final_state(workdir)["step"]
    assert 5 <= stopped_at < SIGTERM_STEPS
    # Restart with the same workdir: it resumes and finishes.
    resumed = subprocess.run(child + ["0"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Resumed from" in resumed.stdout and f"at step {stopped_at}" in resumed.stdout
    _run(reference_dir, steps=SIGTERM_STEPS)
    final, reference = _final_state(workdir), _final_state(reference_dir)
    assert final["step"] == reference["step"] == SIGTERM_STEPS
    chex.assert_trees_all_equal(final["params"], reference["params"])
    chex.assert_trees_all_equal(final["ema_params"], reference["ema_params"])


if __name__ == "__main__":
    _run(sys.argv[1], steps=int(sys.argv[2]), data=_SlowData(sleep=float(sys.argv[3])))
