"""SIGTERM, SIGINT and SIGHUP: save what is worth saving and exit in seconds; a second SIGINT, or a
signal while there is nothing new to save (the first step's compilation), exits at once.

Each case runs a child process (this file as a script) that trains a fake model, as
`experiments/train.py` does: the loop, then the exit status `stop_signals.exit_status` gives.
The child's batches take `SLOW_S` each, so that a signal lands mid-run.
"""

import os
import signal
import subprocess
import sys
import time

import chex
import pytest
import xla_test_flags

import fakes  # tests/fakes.py
from nfnets_jax.runtime import stop_signals
from nfnets_jax.train import checkpointing, loop

pytestmark = pytest.mark.slow  # child processes

STEPS = 40
SLOW_S = 0.1
EXIT_WITHIN_S = 15.0
HEAVY_OPS = 1500  # the "slow compile" child's unrolled ops: a compilation of tens of seconds


def _child(workdir, *, steps=STEPS, sleep=SLOW_S, heavy=False):
    env = dict(os.environ)
    if heavy:  # compiled as a real run compiles (optimisations on), and never from a cache
        env = xla_test_flags.without_session_cache({**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(workdir), str(steps), str(sleep),
                             "heavy" if heavy else "light"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(process, text, lines, timeout=300):
    """Reads the child's output until a line containing `text` (kept in `lines`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return
    pytest.fail(f"the child never printed {text!r}:\n{''.join(lines)}")


def _finish(process, lines, timeout=EXIT_WITHIN_S):
    sent = time.time()
    try:
        rest, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the child did not exit within {timeout}s of the signal:\n{''.join(lines)}")
    return "".join(lines) + rest, time.time() - sent


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final state of an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    process = _child(workdir, sleep=0.0)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return checkpointing.read_workdir_state(str(workdir))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_saves_the_step_exits_in_seconds_and_the_run_resumes_bit_exactly(signum, tmp_path, reference):
    workdir = tmp_path / "run"
    process, lines = _child(workdir), []
    _wait_for(process, "step 5/", lines)
    process.send_signal(signum)
    output, seconds = _finish(process, lines)
    name = signal.Signals(signum).name
    assert process.returncode == stop_signals.exit_status(signum, saved=True), output
    assert f"{name}: saved step" in output and "Traceback" not in output, output
    assert seconds < EXIT_WITHIN_S
    saved = checkpointing.read_workdir_state(str(workdir))["step"]
    assert 5 <= saved < STEPS

    resumed = _child(workdir, sleep=0.0)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"at step {saved}." in output, output
    final = checkpointing.read_workdir_state(str(workdir))
    chex.assert_trees_all_equal(final["params"], reference["params"])
    chex.assert_trees_all_equal(final["ema_params"], reference["ema_params"])


def test_a_second_sigint_exits_at_once_without_a_traceback(tmp_path):
    workdir = tmp_path / "run"
    process, lines = _child(workdir, sleep=2.0), []  # each step waits 2 s for its batch
    _wait_for(process, "First step", lines)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, seconds = _finish(process, lines)
    assert process.returncode == 128 + signal.SIGINT, output
    assert "SIGINT again: exiting now" in output and "Traceback" not in output, output
    assert "KeyboardInterrupt" not in output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_the_first_compilation_exits_at_once(signum, tmp_path):
    """Nothing new to save while the first step compiles: leave now, not after a compilation that
    can outlast a preemption notice."""
    workdir = tmp_path / "run"
    process, lines = _child(workdir, heavy=True), []
    _wait_for(process, "fake_net/~/linear/w", lines)  # the parameter table: the step compiles next
    time.sleep(2.0)
    process.send_signal(signum)
    output, seconds = _finish(process, lines)
    assert "First step" not in output, f"the compilation finished within 2 s; make HEAVY_OPS larger\n{output}"
    assert process.returncode == 128 + signum, output
    assert "nothing new to save yet" in output and "Traceback" not in output, output
    assert seconds < EXIT_WITHIN_S


def _heavy_forward(num_classes):
    """The fake classifier behind a long unrolled chain of ops: its step compiles for tens of seconds."""
    import haiku as hk  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    class HeavyNet(hk.Module):
        """Parameter paths of the fake model (`fake_net/~/linear/w`) behind the chain."""

        def __init__(self):
            super().__init__(name="fake_net")
            self.linear = hk.Linear(num_classes, name="linear")

        def __call__(self, images, is_training):
            x = images.reshape(images.shape[0], -1)
            for index in range(HEAVY_OPS):
                x = jnp.sin(x * (1.0 + index * 1e-6)) + x
            return self.linear(x)

    return hk.transform_with_state(lambda images, is_training: HeavyNet()(images, is_training))


class _SlowData(fakes.FakeData):
    def __init__(self, sleep):
        super().__init__()
        self.sleep = sleep

    def train_batches(self, start_step, *, global_batch_size):
        for batch in super().train_batches(start_step, global_batch_size=global_batch_size):
            time.sleep(self.sleep)
            yield batch


if __name__ == "__main__":
    workdir_arg, steps_arg, sleep_arg, weight = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    config = fakes.fake_config(**{"train.steps": steps_arg, "checkpoint.every_steps": 1000})
    experiment = fakes.fake_experiment(config, _SlowData(sleep_arg), drop_rate=0.2)
    if weight == "heavy":
        experiment.forward = _heavy_forward(4)
    stop_signals.leave_at_once("before training started")
    summary = loop.run(experiment, workdir_arg, prefetch=1, progress_bar=False)
    sys.stdout.flush()
    if summary.stopped_by == "preempted":
        os._exit(stop_signals.exit_status(summary.stop_signal, saved=True))  # pylint: disable=protected-access
