"""A peer killed with -9: the survivor exits with one line naming the dead process and what to
do, exit code 1, without JAX's C++ abort ("Terminating process because the JAX distributed
service detected fatal errors", a stack dump, "Fatal Python error: Aborted"); at once when it is
in a collective, within the heartbeat timeout when it waits elsewhere.

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
# A survivor in a collective exits at once; one blocked elsewhere (in orbax's commit barrier of an
# asynchronous save, which waits for the dead peer) exits when the coordination service declares
# the peer dead, after the heartbeat timeout: the bound that holds in every case.
EXIT_BOUND_S = HEARTBEAT_S + 15
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_one_and_watch_the_other(commands, checkpoint_dir, victim):
    """Starts one worker per command, SIGKILLs `victim` once `checkpoint_dir` exists, and returns
    the survivor's (exit code, stderr, seconds from the kill to its exit)."""
    env = xla_test_flags.without_session_cache(dict(os.environ, XLA_FLAGS=xla_test_flags.cpu_flags(1),
                                                    JAX_PLATFORMS="cpu"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workers = [subprocess.Popen(command, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for command in commands]
    survivor = workers[1 - victim]
    try:
        deadline = time.time() + TIMEOUT_S
        while time.time() < deadline and not os.path.isdir(checkpoint_dir):
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
    assert exit_seconds < EXIT_BOUND_S, f"{exit_seconds:.1f}s"
    for noise in ("Fatal Python error", "Traceback", "Check failure", "Terminating process"):
        assert noise not in stderr, stderr
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert survivor.returncode == 1 and len(ours) == 1, stderr
    return ours[0]


@pytest.mark.slow
def test_the_survivor_of_a_killed_peer_exits_in_one_line_naming_it(tmp_path):
    port = _free_port()
    line = _kill_one_and_watch_the_other(
        [[sys.executable, os.path.abspath(__file__), str(port), str(i), str(tmp_path)] for i in range(2)],
        tmp_path / "checkpoints" / str(EVERY), victim=1)
    assert "process 0 of 2 stopped" in line and "process 1 most likely died" in line, line
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
        workdir / "checkpoints" / str(EVERY), victim=0)
    assert "process 1 of 2 stopped" in line and "process 0" in line, line
    assert "Restart all 2 processes" in line and str(workdir) in line, line


if __name__ == "__main__":
    port, process_id, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # As experiments.train does for every multi-process run: a watcher turns JAX's C++ abort
    # (the survivor may be waiting in orbax's commit, not in a collective) into one line.
    if supervisor.wanted(True):
        supervisor.supervise(supervisor.own_command(), process_id=process_id, num_processes=2,
                             restart_hint="Restart all 2 processes with the same command: training "
                                          f"resumes exactly from the last checkpoint in {workdir}.")
    supervisor.die_with_watcher()
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    config = fakes.fake_config(**{"train.steps": STEPS, "checkpoint.every_steps": EVERY})
    try:
        loop.run(fakes.fake_experiment(config, _SlowData(sleep=0.05)), workdir, prefetch=1)
    except Exception as error:  # pylint: disable=broad-except  # as experiments/train.py's main
        distributed.leave_after_failure(error, workdir)
    distributed.shutdown()
