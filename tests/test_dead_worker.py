"""A peer killed with -9: the survivor exits with one line naming the dead process and what to
do, exit code 1, without JAX's C++ abort ("Terminating process because the JAX distributed
service detected fatal errors", a stack dump, "Fatal Python error: Aborted"). How soon depends on
where the survivor is, and both cases are measured: in a collective (its next step's all-reduce
fails as soon as the dead peer's connection is gone: seconds), or waiting elsewhere (for a slow
batch: until JAX's coordination service declares the peer dead, after the heartbeat timeout).

Run as a script (`python tests/test_dead_worker.py PORT PROCESS_ID WORKDIR`), this file is one of
the two worker processes: a fake-model run whose step failures go through the same handler as
`experiments.train`'s main (`distributed.leave_after_failure`), under the same watcher
(`supervisor.supervise`). The second test runs `experiments.train` itself and kills process 0.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import xla_test_flags

from nfnets_jax.runtime import distributed, supervisor
import fakes  # tests/fakes.py
from nfnets_jax.train import loop
from test_train_checkpointing import _SlowData

EVERY = 2
STEPS = 200
HEARTBEAT_S = 30  # the default
# A survivor in a collective exits within seconds (measured 0.3-3 s on 2 loaded cores); one
# blocked elsewhere (a slow batch, orbax's commit barrier of an asynchronous save, which waits for
# the dead peer) exits when the coordination service declares the peer dead, after the heartbeat
# timeout: the bound that holds in every case.
IN_A_COLLECTIVE_BOUND_S = 15
EXIT_BOUND_S = HEARTBEAT_S + 15
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_one_and_watch_the_other(commands, ready, victim, *, bound_s=EXIT_BOUND_S):
    """Starts one worker per command, SIGKILLs `victim` once `ready()` is true, and returns the
    survivor's one line; asserts it exited within `bound_s` of the kill (and prints how soon)."""
    env = xla_test_flags.without_session_cache(dict(os.environ, XLA_FLAGS=xla_test_flags.cpu_flags(1),
                                                    JAX_PLATFORMS="cpu"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workers = [subprocess.Popen(command, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for command in commands]
    survivor = workers[1 - victim]
    try:
        deadline = time.time() + TIMEOUT_S
        while time.time() < deadline and not ready():
            assert survivor.poll() is None, survivor.communicate()
            time.sleep(0.1)
        workers[victim].send_signal(signal.SIGKILL)  # a watcher: its child dies with it
        killed = time.time()
        _, stderr = survivor.communicate(timeout=TIMEOUT_S)
        exit_seconds = time.time() - killed
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    print(f"survivor exited {exit_seconds:.1f}s after its peer was killed (bound {bound_s}s)")
    assert exit_seconds < bound_s, f"{exit_seconds:.1f}s"
    for noise in ("Fatal Python error", "Traceback", "Check failure", "Terminating process"):
        assert noise not in stderr, stderr
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert survivor.returncode == 1 and len(ours) == 1, stderr
    return ours[0]


def _train_steps_logged(workdir) -> int:
    metrics = workdir / "metrics.jsonl"
    return metrics.read_text().count('"split": "train"') if metrics.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("where", ["in_a_collective", "waiting_for_a_batch"])
def test_the_survivor_of_a_killed_peer_exits_in_one_line_naming_it(tmp_path, where):
    """Both places a survivor can be when its peer dies, each with its own bound."""
    port = _free_port()
    if where == "in_a_collective":  # steps back to back, no save in flight: the next all-reduce fails
        ready, bound = (lambda: _train_steps_logged(tmp_path) >= 3), IN_A_COLLECTIVE_BOUND_S
    else:  # the survivor waits 10 minutes for its next batch: only the heartbeat can tell it
        ready, bound = (lambda: _train_steps_logged(tmp_path) >= 3 and time.sleep(2) is None), EXIT_BOUND_S
    line = _kill_one_and_watch_the_other(
        [[sys.executable, os.path.abspath(__file__), str(port), str(i), str(tmp_path), where] for i in range(2)],
        ready, victim=1, bound_s=bound)
    assert "process 0 of 2 stopped" in line and "process 1" in line, line
    assert "Restart all 2 processes" in line and "resumes exactly" in line, line


@pytest.mark.slow
def test_the_survivor_of_a_killed_coordinator_exits_in_one_line_naming_it(tmp_path):
    """Process 0 runs the coordination service: when it dies, JAX's C++ client on the survivor
    aborts the process (a FATAL log line and a stack dump) while the Python side is still in its
    step; the watcher that `experiments.train` runs under turns that into our one line."""
    port, workdir = _free_port(), tmp_path / "run"
    line = _kill_one_and_watch_the_other(
        [[sys.executable, "-m", "experiments.train", "--config=configs/digits.py", f"--workdir={workdir}",
          "--config.train.steps=100000", f"--config.checkpoint.every_steps={EVERY}",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"] for i in range(2)],
        lambda: os.path.isdir(workdir / "checkpoints" / str(EVERY)), victim=0)
    assert "process 1 of 2 stopped" in line and "process 0" in line, line
    assert "Restart all 2 processes" in line and str(workdir) in line, line


class _StallingData(fakes.FakeData):
    """Batches at once up to step `stall_from`, then one every 10 minutes."""

    def __init__(self, stall_from):
        super().__init__()
        self.stall_from = stall_from

    def train_batches(self, start_step, *, global_batch_size):
        for step, batch in enumerate(super().train_batches(start_step, global_batch_size=global_batch_size),
                                     start=start_step + 1):
            if step >= self.stall_from:
                time.sleep(600)
            yield batch


if __name__ == "__main__":
    port, process_id, workdir, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # As experiments.train does for every multi-process run: a watcher turns JAX's C++ abort
    # (the survivor may be waiting in orbax's commit, not in a collective) into one line.
    if supervisor.wanted(True):
        supervisor.supervise(supervisor.own_command(), process_id=process_id, num_processes=2,
                             restart_hint="Restart all 2 processes with the same command: training "
                                          f"resumes exactly from the last checkpoint in {workdir}.")
    supervisor.die_with_watcher()
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    config = fakes.fake_config(**{"train.steps": STEPS, "checkpoint.every_steps": 10_000, "log.every_steps": 1})
    data = _SlowData(sleep=0.05) if where == "in_a_collective" else _StallingData(stall_from=4)
    try:
        loop.run(fakes.fake_experiment(config, data), workdir, prefetch=1)
    except Exception as error:  # pylint: disable=broad-except  # as experiments/train.py's main
        distributed.leave_after_failure(error, workdir)
    distributed.shutdown()
