"""SIGTERM while the input pipeline is stuck: the run saves and the process exits in seconds.

Preemptible and spot VMs give about 30 s of notice. The child below trains a fake model on a
tf.data pipeline (a Python generator inside `tf.data.Dataset.from_generator`, prefetched by
tf.data) whose batches take 120 s each from step `SLOW_FROM` on, as a slow decode or a reshuffle
can; SIGTERM arrives while the loop waits for such a batch. The process must save the last
completed step and exit well within the notice, not when the batch finally arrives.

Run as a script (`python tests/test_sigterm_latency.py WORKDIR`), this file is the child.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import fakes  # tests/fakes.py
from nfnets_jax.train import checkpointing, loop

STEPS = 50
SLOW_FROM = 3  # batches of steps >= SLOW_FROM (1-based) take SLOW_S each
SLOW_S = 120.0
EXIT_WITHIN_S = 10.0


def _logged_train_steps(metrics_file) -> list[int]:
    if not metrics_file.exists():
        return []
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in records if r["split"] == "train"]


@pytest.mark.slow
def test_sigterm_while_the_pipeline_is_stuck_saves_and_exits_within_seconds(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(workdir)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            if SLOW_FROM - 1 in _logged_train_steps(workdir / "metrics.jsonl"):
                break
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()[0]
        time.sleep(1.0)  # the loop is now waiting for the slow batch of step SLOW_FROM
        process.send_signal(signal.SIGTERM)
        sent = time.time()
        output, _ = process.communicate(timeout=SLOW_S)
        exit_seconds = time.time() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"SIGTERM: saved step {SLOW_FROM - 1}" in output, output
    assert exit_seconds < EXIT_WITHIN_S, f"exited {exit_seconds:.1f}s after SIGTERM\n{output}"
    assert checkpointing.read_workdir_state(str(workdir))["step"] == SLOW_FROM - 1


def _slow_tf_batches(data: fakes.FakeData, start_step: int, global_batch_size: int):
    """FakeData's batches through a tf.data generator that stalls from step SLOW_FROM on."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    def generate():
        for step, batch in enumerate(data.train_batches(start_step, global_batch_size=global_batch_size),
                                     start=start_step + 1):
            if step >= SLOW_FROM:
                time.sleep(SLOW_S)
            yield batch

    example = next(data.train_batches(0, global_batch_size=global_batch_size))
    signature = {key: tf.TensorSpec(value.shape, tf.as_dtype(value.dtype)) for key, value in example.items()}
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(2)
    return dataset.as_numpy_iterator()


if __name__ == "__main__":
    config = fakes.fake_config(**{"train.steps": STEPS, "checkpoint.every_steps": 100})
    data = fakes.FakeData()
    experiment = fakes.fake_experiment(config, data)
    experiment.train_batches = lambda start: _slow_tf_batches(data, start, config.train.batch_size)
    summary = loop.run(experiment, sys.argv[1], prefetch=1)
    print(f"stopped by {summary.stopped_by} at step {summary.step}", flush=True)
