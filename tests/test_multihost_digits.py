"""Multi-host on real data, through the real commands: 2 processes x 2 CPU devices on the digits
data train and evaluate as 1 process x 4 devices do.

1. `experiments.train` runs 6 steps on digits as 2 processes x 2 devices (gloo over 127.0.0.1),
   saving at steps 3 and 6.
2. A copy of its workdir without step 6 is resumed by ONE process with 4 devices: steps 4-6 then
   see the batches the two processes saw only if the training stream does not depend on the
   process layout, and the final params must match the 2-process run's to float tolerance.
3. `experiments.eval` evaluates the 2-process workdir as 2 processes (each reads its slice of
   the test split) and reports one result, which must equal the 1-process run's final eval.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import chex
import pytest

from nfnets_jax.train import pretrained

TIMEOUT_S = 600
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
RUN_FLAGS = [f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=3",
             "--config.checkpoint.keep=2", "--config.eval.every_steps=0", "--config.log.every_steps=3",
             "--config.train.batch_size=32", "--config.eval.batch_size=64", "--config.train.warmup_steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu")


def _two_processes(module: str, args: list[str]) -> list[str]:
    port = _free_port()
    workers = [subprocess.Popen(
        [sys.executable, "-m", module, *args, f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        env=_env(2), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]
    return outputs


def _final_eval(workdir) -> dict:
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in records if r["split"] == "eval"][-1]


@pytest.mark.slow
def test_digits_two_processes_train_resume_on_one_and_evaluate_as_one(tmp_path):
    two = str(tmp_path / "two_processes")
    outputs = _two_processes("experiments.train", ["--config=configs/digits.py", f"--workdir={two}", *RUN_FLAGS])
    assert "2 process(es), 4 cpu device(s)" in outputs[0]

    resumed = str(tmp_path / "resumed_on_one")
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
    one = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/digits.py",
                          f"--workdir={resumed}", *RUN_FLAGS], env=_env(4), cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "1 process(es), 4 cpu device(s)" in one.stdout and "at step 3." in one.stdout, one.stdout

    two_state, one_state = pretrained.read_workdir_state(two), pretrained.read_workdir_state(resumed)
    assert two_state["step"] == one_state["step"] == STEPS
    # Same batches, same math; the all-reduce order over 2 x 2 vs 4 local devices: ~1e-6.
    chex.assert_trees_all_close(two_state["params"], one_state["params"], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(two_state["ema_params"], one_state["ema_params"], atol=1e-5, rtol=1e-5)

    eval_outputs = _two_processes("experiments.eval", ["--config=configs/digits.py", f"--workdir={two}",
                                                       "--config.eval.batch_size=64"])
    assert eval_outputs[0].count("top-1") == 2  # raw and EMA, printed by process 0 only
    assert "top-1" not in eval_outputs[1]
    with open(os.path.join(two, "eval_results.json")) as f:
        distributed_eval = json.load(f)
    single = _final_eval(resumed)
    assert distributed_eval["num_examples"] == single["num_examples"] == 360
    for key in ("top_1_acc", "ema_top_1_acc", "loss", "ema_loss"):
        assert distributed_eval[key] == pytest.approx(single[key], abs=1e-5), key
