"""Fault injection: kill -9 mid-run and mid-save, corrupt checkpoints, a dead worker.

The reference for every resume is an uninterrupted run of the same config: the run that
survives the fault must end bit-identical to it (params, EMA and, through the per-leaf CRC32s
that every checkpoint records, the optimizer state and everything else in the train state).

Run as a script, this file is the child process of the subprocess tests:
  `python tests/test_fault_injection.py train WORKDIR SLEEP [KILL_IN_SAVE_OF_STEP]`: a fake-model
    run of `STEPS` steps; with the last argument it SIGKILLs itself inside orbax's commit of that
    step's save (all files written to the temporary directory, the rename not yet done).
  `python tests/test_fault_injection.py worker PORT PROCESS_ID WORKDIR STEPS SLEEP`: one of two
    processes (gloo over 127.0.0.1) of a multi-process run, with short heartbeat timeouts.
"""

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
import xla_test_flags

import fake_object_store  # tests/fake_object_store.py
from nfnets_jax.runtime import stop_signals
import fakes  # tests/fakes.py
from nfnets_jax.train import checkpointing, loop
from test_train_checkpointing import _SlowData

STEPS = 16
EVERY = 4
SUBPROCESS_TIMEOUT_S = 240  # generous: CI boxes and shared machines compile slowly
HEARTBEAT_S = 5
CHECKPOINT_LOGGER = checkpointing.__name__
# orbax's restore of a corrupt checkpoint leaves a failed asyncio task behind: noise, not a result.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.slow]  # subprocess end-to-end runs (pytest.ini)


def _config(steps=STEPS):
    return fakes.fake_config(**{"train.steps": steps, "checkpoint.every_steps": EVERY, "checkpoint.keep": 2})


def _run(workdir, steps=STEPS, sleep=0.0):
    config = _config(steps)
    return loop.run(fakes.fake_experiment(config, _SlowData(sleep=sleep), drop_rate=0.2),
                    str(workdir), prefetch=1)


def _step_dirs(workdir):
    return sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())


def _unfinished(workdir):
    return sorted(name for name in os.listdir(workdir / "checkpoints") if ".orbax-checkpoint-tmp" in name)


def _meta(workdir, step):
    with open(workdir / "checkpoints" / str(step) / "meta" / "metadata") as f:
        return json.load(f)


def _assert_same_final_state(workdir, reference_dir):
    """Bit-identical train state: params, EMA, optimizer state, RNG and step, every leaf."""
    final, _ = checkpointing.read_latest(str(workdir / "checkpoints"))
    reference, _ = checkpointing.read_latest(str(reference_dir / "checkpoints"))
    assert int(np.asarray(final["step"])) == int(np.asarray(reference["step"])) == STEPS
    assert "opt_state" in reference and reference["ema_params"]
    chex.assert_trees_all_equal(final, reference)


def _wait_until(condition, process, what):
    """Polls `condition()` while `process` runs, failing after SUBPROCESS_TIMEOUT_S."""
    deadline = time.time() + SUBPROCESS_TIMEOUT_S
    while time.time() < deadline and process.poll() is None:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen (exit code {process.poll()})")


def _newest_train_step(metrics_file, skip_lines=0):
    """The highest train step logged after the first `skip_lines` lines (0 if none yet)."""
    if not metrics_file.exists():
        return 0
    lines = metrics_file.read_text().splitlines()[skip_lines:]
    records = map(json.loads, (line for line in lines if line.endswith("}")))
    return max((r["step"] for r in records if r["split"] == "train"), default=0)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir)
    return workdir


# ---- kill -9 -------------------------------------------------------------------------------------

def test_sigkill_mid_save_and_mid_run_resumes_bit_exactly_from_the_last_complete_checkpoint(
        tmp_path, reference_dir, capsys):
    workdir = tmp_path / "run"
    child = [sys.executable, os.path.abspath(__file__), "train", str(workdir)]

    # 1. Killed inside the commit of step 8's save: step 4 is complete, step 8 only a temp dir.
    killed_in_save = subprocess.run(child + ["0", "8"], capture_output=True, text=True,
                                    timeout=SUBPROCESS_TIMEOUT_S)
    assert killed_in_save.returncode == -signal.SIGKILL, killed_in_save.stdout + killed_in_save.stderr
    assert _step_dirs(workdir) == [4]
    partial = _unfinished(workdir)
    assert len(partial) == 1 and partial[0].startswith("8."), partial

    # 2. Restart; SIGKILL it from outside at a pseudo-random (seeded) step after it resumed.
    kill_at = random.Random(2021).randint(EVERY + 3, STEPS - 2)
    lines_before = len((workdir / "metrics.jsonl").read_text().splitlines())
    process = subprocess.Popen(child + ["0.05"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_until(lambda: _newest_train_step(workdir / "metrics.jsonl", lines_before) >= kill_at,
                    process, f"train step {kill_at}")
        process.kill()
        output, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, output
    assert "Resumed from" in output and "at step 4." in output, output
    assert f"Deleting unfinished checkpoint save(s) {partial[0]}" in output, output
    assert partial[0] not in _unfinished(workdir)  # the partial save was cleaned, never loaded
    latest_complete = max(_step_dirs(workdir))
    assert latest_complete >= 8

    # 3. Restart again (here, in this process: a fresh read of what the kills left on disk): it
    # resumes from the newest complete checkpoint and finishes.
    capsys.readouterr()
    assert _run(workdir).stopped_by == "completed"
    assert f"at step {latest_complete}." in capsys.readouterr().out
    assert not _unfinished(workdir)
    _assert_same_final_state(workdir, reference_dir)
    # Steps logged between the last checkpoint and each kill were dropped on resume: each step once.
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert logged == list(range(1, STEPS + 1))


# ---- corrupt checkpoints ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_at_8(tmp_path_factory):
    """A workdir whose run stopped (as if preempted) at step 8: checkpoints 4 and 8."""
    workdir = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stop_signals.StopRequests, "should_stop", lambda self, step: step == 8)
        assert _run(workdir).step == 8
    assert _step_dirs(workdir) == [4, 8]
    return workdir


def _data_files(step_dir):
    """The state item's data files (OCDBT `d/` folders: the per-process ones and the merged one)."""
    return [os.path.join(root, name) for root, _, names in os.walk(step_dir / "state") for name in names
            if os.path.basename(root) == "d"]


def _truncate_data(step_dir):
    for path in _data_files(step_dir):
        os.truncate(path, os.path.getsize(path) // 2)


def _garble_data(step_dir):
    for path in _data_files(step_dir):
        data = bytearray(open(path, "rb").read())
        for i in range(len(data) // 3, 2 * len(data) // 3):
            data[i] ^= 0xA5
        open(path, "wb").write(bytes(data))


def _rewrite_one_value(step_dir, new_value=None):
    """A checkpoint that orbax reads back without complaint, but holding a changed weight: only
    the fingerprints recorded at save time can tell. With `new_value` (e.g. NaN), that value is
    written and the record's fingerprints are rewritten to match it, so that only the check for
    non-finite params can tell."""
    import jax
    import orbax.checkpoint as ocp

    step = int(step_dir.name)
    handlers = {"state": ocp.StandardCheckpointHandler()}
    source = ocp.CheckpointManager(str(step_dir.parent), item_handlers=handlers)
    metadata = source.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          getattr(metadata, "tree", metadata))
    state = source.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    source.close()
    weights = state["params"]["fake_net/~/linear"]["w"]
    state["params"]["fake_net/~/linear"]["w"] = (weights.at[0, 0].add(1e-3) if new_value is None
                                                 else weights.at[0, 0].set(new_value))
    scratch = step_dir.parent.parent / "scratch"
    writer = ocp.CheckpointManager(str(scratch), item_handlers=handlers)
    writer.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    writer.close()
    shutil.rmtree(step_dir / "state")
    shutil.copytree(scratch / str(step) / "state", step_dir / "state")
    shutil.rmtree(scratch)
    if new_value is not None:  # a record that matches the new value: only the finite check can tell
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
        meta["fingerprints"] = checkpointing.host_fingerprints(state)
        (step_dir / "meta" / "metadata").write_text(json.dumps(meta))


def _remove(relative):
    return lambda step_dir: os.remove(step_dir / relative)


CORRUPTIONS = {
    "truncated_data_file": _truncate_data,
    "garbled_data_file": _garble_data,
    "missing_state_metadata": _remove("state/_METADATA"),
    "missing_meta_record": _remove("meta/metadata"),
    "readable_but_changed_weight": _rewrite_one_value,
    "nan_weight_with_matching_fingerprints": lambda step_dir: _rewrite_one_value(step_dir, float("nan")),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_warns_once_and_resumes_bit_exactly_from_the_previous(
        corruption, tmp_path, stopped_at_8, reference_dir, caplog, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_8, workdir)
    CORRUPTIONS[corruption](workdir / "checkpoints" / "8")
    with caplog.at_level(logging.WARNING, logger=CHECKPOINT_LOGGER):
        summary = _run(workdir)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == CHECKPOINT_LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert os.path.join(str(workdir), "checkpoints", "8") in warnings[0] and "corrupt" in warnings[0]
    assert "at step 4." in capsys.readouterr().out
    assert summary.stopped_by == "completed" and summary.step == STEPS
    assert os.path.isdir(workdir / "corrupt_checkpoints" / "8")  # kept for inspection, out of the way
    _assert_same_final_state(workdir, reference_dir)


def test_when_every_checkpoint_is_corrupt_nothing_is_loaded_and_the_error_says_what_to_do(
        tmp_path, stopped_at_8):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_8, workdir)
    _garble_data(workdir / "checkpoints" / "8")
    _remove("state/_METADATA")(workdir / "checkpoints" / "4")
    with pytest.raises(checkpointing.CorruptCheckpointError,
                       match=r"(?s)step 8: .*step 4: .*Nothing was loaded.*move the checkpoints aside"):
        _run(workdir)
    assert _step_dirs(workdir) == [4, 8]  # left where they were for the user to decide


# ---- a dead worker ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STORE_URL = f"{fake_object_store.SCHEME}://bucket/multi"


def _start_workers(store, steps, sleep):
    """Two worker processes training in `STORE_URL`, a fake object store backed by `store`."""
    port = _free_port()
    env = xla_test_flags.without_session_cache(dict(os.environ, XLA_FLAGS=xla_test_flags.cpu_flags(1),
                                                    JAX_PLATFORMS="cpu", **{fake_object_store.ENV_ROOT: str(store)}))
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(port), str(i),
                              STORE_URL, str(steps), str(sleep)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def test_a_killed_worker_makes_the_survivor_exit_in_bounded_time_and_both_resume(tmp_path):
    # The workdir is a URL of a fake object store: the two processes reach it only through it.
    store, steps = tmp_path / "store", 3 * EVERY
    workdir = store / "bucket" / "multi"  # where the store keeps the files, for the checks below
    workers = _start_workers(store, steps, sleep=0.1)
    try:
        # Kill worker 1 once the first checkpoint is committed (its step directory renamed).
        _wait_until(lambda: os.path.isdir(workdir / "checkpoints" / str(EVERY)), workers[0],
                    f"the checkpoint of step {EVERY}")
        workers[1].kill()
        killed_at = time.time()
        try:
            survivor_output, _ = workers[0].communicate(timeout=10 * HEARTBEAT_S + 20)
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving worker hung after its peer was killed")
        exit_seconds = time.time() - killed_at
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.communicate()
    assert workers[0].returncode != 0, survivor_output
    assert "another task died" in survivor_output or "heartbeat" in survivor_output, survivor_output
    print(f"survivor exited with {workers[0].returncode} {exit_seconds:.1f}s after its peer was killed")
    latest = max(_step_dirs(workdir))
    assert latest >= EVERY

    # Restart both: they resume from the last complete checkpoint and finish.
    workers = _start_workers(store, steps, sleep=0.0)
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=SUBPROCESS_TIMEOUT_S)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert f"at step {latest}." in outputs[0], outputs[0]
    assert checkpointing.read_workdir_state(str(workdir))["step"] == steps


def _kill_self_in_commit_of(step: int) -> None:
    """SIGKILLs this process inside orbax's commit (temp dir -> step dir rename) of `step`'s save."""
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if os.path.basename(str(self._final_path)) == str(step):  # pylint: disable=protected-access
            os.kill(os.getpid(), signal.SIGKILL)
        return await commit(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def _worker(port: int, process_id: int, workdir: str, steps: int, sleep: float) -> None:
    import jax  # pylint: disable=import-outside-toplevel

    fake_object_store.register()  # the root comes from the environment

    from nfnets_jax.runtime import distributed  # pylint: disable=import-outside-toplevel

    # Heartbeats short enough for a test (`--heartbeat_timeout_seconds`): a peer that stops
    # heartbeating for HEARTBEAT_S seconds makes the coordination service stop every process.
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           heartbeat_timeout_seconds=HEARTBEAT_S)
    _run(workdir, steps=steps, sleep=sleep)
    jax.distributed.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    if sys.argv[1] == "train":
        if len(sys.argv) > 4:
            _kill_self_in_commit_of(int(sys.argv[4]))
        _run(sys.argv[2], sleep=float(sys.argv[3]))
    else:
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
