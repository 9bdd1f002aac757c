"""A peer killed with -9: the survivor exits at once with one line naming the dead process and
what to do, exit code 1, without JAX's shutdown abort ("Fatal Python error: Aborted", a C++
stack dump) that waiting for the dead peer in the shutdown barrier would end in.

Run as a script (`python tests/test_dead_worker.py PORT PROCESS_ID WORKDIR`), this file is one of
the two worker processes: a fake-model run whose step failures go through the same handler as
`experiments.train`'s main (`distributed.leave_after_failure`).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import xla_test_flags

from nfnets_jax.train import distributed, fakes, loop
from test_train_checkpointing import _SlowData

EVERY = 2
STEPS = 200
HEARTBEAT_S = 30  # the default: the survivor must not need it
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_survivor_of_a_killed_peer_exits_in_one_line_naming_it(tmp_path):
    port = _free_port()
    env = xla_test_flags.without_session_cache(dict(os.environ, XLA_FLAGS=xla_test_flags.cpu_flags(1), JAX_PLATFORMS="cpu"))
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i), str(tmp_path)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    try:
        deadline = time.time() + TIMEOUT_S
        while time.time() < deadline and not os.path.isdir(tmp_path / "checkpoints" / str(EVERY)):
            assert workers[0].poll() is None, workers[0].communicate()
            time.sleep(0.1)
        workers[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, stderr = workers[0].communicate(timeout=TIMEOUT_S)
        exit_seconds = time.time() - killed
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert workers[0].returncode == 1, stderr
    assert exit_seconds < HEARTBEAT_S, f"{exit_seconds:.1f}s"
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1, stderr
    assert "process 0 of 2 stopped" in ours[0] and "process 1 most likely died" in ours[0]
    assert "Restart all 2 processes" in ours[0] and "resumes exactly" in ours[0]
    assert "Fatal Python error" not in stderr and "Traceback" not in stderr, stderr


if __name__ == "__main__":
    port, process_id, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    config = fakes.fake_config(**{"train.steps": STEPS, "checkpoint.every_steps": EVERY})
    try:
        loop.run(fakes.fake_experiment(config, _SlowData(sleep=0.05)), config, workdir, prefetch=1)
    except Exception as error:  # pylint: disable=broad-except  # as experiments/train.py's main
        distributed.leave_after_failure(error, workdir)
    distributed.shutdown()
