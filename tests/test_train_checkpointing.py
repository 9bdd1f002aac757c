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

from nfnets_jax.runtime import stop_signals
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
    monkeypatch.setattr(stop_signals.StopRequests, "should_stop", lambda self, step: step == 6)
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


@pytest.mark.slow
def test_a_save_that_cannot_be_written_is_one_line_and_the_previous_checkpoint_stays_the_newest(tmp_path):
    """A full disk, a quota or a file-size limit (here: RLIMIT_FSIZE, as `ulimit -f` sets it) fails
    orbax's background write: one line naming the step, the folder and the reason, the newest
    complete checkpoint unchanged, and the next run resumes from it."""
    workdir = tmp_path / "run"
    child = [sys.executable, os.path.abspath(__file__), str(workdir)]
    first = subprocess.run(child + ["4", "0", "0"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    limited = subprocess.run(child + ["8", "0", "65536"], capture_output=True, text=True, timeout=300)
    errors = [line for line in limited.stderr.splitlines() if line.strip()]
    assert limited.returncode == 1 and len(errors) == 1, limited.stdout + limited.stderr
    assert errors[0].startswith(f"error: Saving the checkpoint of step 8 to {workdir / 'checkpoints'} failed: "
                                "File too large"), errors[0]
    assert "The newest complete checkpoint is step 4" in errors[0]
    assert _final_state(workdir)["step"] == 4
    resumed = subprocess.run(child + ["8", "0", "0"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "at step 4." in resumed.stdout, resumed.stdout + resumed.stderr
    assert _final_state(workdir)["step"] == 8


if __name__ == "__main__":
    from nfnets_jax.runtime import program_output  # pylint: disable=import-outside-toplevel

    program_output.for_program()  # as experiments/train.py: library loggers quiet
    file_size_limit = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    if file_size_limit:  # as `ulimit -f`: a write beyond it fails with EFBIG (Python ignores SIGXFSZ)
        import resource  # pylint: disable=import-outside-toplevel
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    # With a limit (0: none), larger images: a checkpoint's data file of ~150 KB, over a 64 KB limit
    # that the run's small metrics files stay under.
    shape = (32, 32, 3) if len(sys.argv) > 4 else (4, 4, 3)
    try:
        _run(sys.argv[1], steps=int(sys.argv[2]), data=_SlowData(sleep=float(sys.argv[3]), image_shape=shape))
    except checkpointing.CheckpointSaveError as error:  # as experiments/train.py's main
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


class _NewestStep:
    def latest_step(self):
        return 4


@pytest.mark.parametrize("processes", [1, 2])
def test_a_failed_save_is_one_save_error_unless_a_collective_of_several_processes_failed(monkeypatch, processes):
    """A save that fails with an OS error is a `CheckpointSaveError` (with the errno's hint) on any
    process count. Without an OS error, one process reports a save error too; with several, the
    save's cross-process collective failed (a peer died), so the error passes on unchanged for
    `distributed.leave_after_failure` to name the peer, as a failed step's collective does."""
    monkeypatch.setattr(checkpointing.jax, "process_count", lambda: processes)
    fake_self = type("FakeCheckpointer", (), {"_in_flight": None, "_failed": False, "_path": "/ckpt",
                                              "_manager": _NewestStep()})()
    report = checkpointing.Checkpointer._reporting_failed_saves  # pylint: disable=protected-access

    def failing(error):
        with report(fake_self, 6):
            raise error

    with pytest.raises(checkpointing.CheckpointSaveError, match="No space left on device"):
        failing(OSError(28, "No space left on device"))
    peer_lost = ValueError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [127.0.0.1]:58024")
    if processes == 1:
        with pytest.raises(checkpointing.CheckpointSaveError, match="step 6"):
            failing(peer_lost)
    else:
        with pytest.raises(ValueError) as raised:
            failing(peer_lost)
        assert raised.value is peer_lost
