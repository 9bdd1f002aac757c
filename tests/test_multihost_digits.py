"""Multi-host on real data, through the real commands: 2 processes x 2 CPU devices on the digits
data train and evaluate as 1 process x 4 devices do.

1. `experiments.train` runs 6 steps on digits as 2 processes x 2 devices (gloo over 127.0.0.1),
   saving at steps 3 and 6.
2. A copy of its workdir without step 6 is resumed by ONE process with 4 devices: steps 4-6 then
   see the batches the two processes saw only if the training stream does not depend on the
   process layout, and the final params must match the 2-process run's to float tolerance.
3. The same 2 x 2 run with `--workdir=fakegs://...` (an object-store URL, `fake_object_store`)
   is killed with SIGKILL on both processes at step 5, after the step-3 save was started, and
   resumed as 2 x 2 on the same URL: its final state must equal the uninterrupted run's bit for
   bit (same layout, same math).
4. `experiments.eval --workdir=<that URL>` evaluates it as 2 processes (each reads its slice of
   the test split) and reports one result, which must equal the 1-process run's final eval.

Run as a script (`python tests/test_multihost_digits.py STORE_ROOT KILL_AT_STEP MODULE ARGS...`),
this file registers the fake object store, optionally SIGKILLs itself when the runner reaches
`KILL_AT_STEP` (0: never), and runs `python -m MODULE ARGS...`: the workers of step 3 and 4.
"""

import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import pytest
import xla_test_flags

import fake_object_store  # tests/fake_object_store.py
from nfnets_jax.runtime import stop_signals
from nfnets_jax.train import checkpointing

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
    return xla_test_flags.without_session_cache(dict(os.environ, XLA_FLAGS=xla_test_flags.cpu_flags(devices),
                                                     JAX_PLATFORMS="cpu"))


def _two_processes(module: str, args: list[str], store: str = "", kill_at: int = 0) -> list[str]:
    """Outputs of `module` run as 2 processes x 2 devices; with `store`, through this file as a
    script (fake object store registered; SIGKILL at step `kill_at` if not 0)."""
    port = _free_port()
    program = [sys.executable, "-m", module] if not store else \
        [sys.executable, os.path.abspath(__file__), store, str(kill_at), module]
    workers = [subprocess.Popen(
        [*program, *args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
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
        if kill_at:  # killed by itself, or (if its peer died first) ended by the dead-peer check
            assert worker.returncode != 0, output[-4000:]
        else:
            assert worker.returncode == 0, output[-4000:]
    if kill_at:
        assert any(worker.returncode == -signal.SIGKILL for worker in workers), \
            outputs[0][-3000:] + "\n--- process 1 ---\n" + outputs[1][-3000:]
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

    two_state, one_state = checkpointing.read_workdir_state(two), checkpointing.read_workdir_state(resumed)
    assert two_state["step"] == one_state["step"] == STEPS
    # Same batches, same math; the all-reduce order over 2 x 2 vs 4 local devices: ~1e-6.
    chex.assert_trees_all_close(two_state["params"], one_state["params"], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(two_state["ema_params"], one_state["ema_params"], atol=1e-5, rtol=1e-5)

    # The same run on an object-store URL, killed with -9 at step 5 and resumed: bit-exact.
    store, url = str(tmp_path / "store"), "fakegs://bucket/digits"
    backing = os.path.join(store, "bucket", "digits")
    run_on_store = ["--config=configs/digits.py", f"--workdir={url}", *RUN_FLAGS]
    _two_processes("experiments.train", run_on_store, store=store, kill_at=5)
    assert str(STEPS) not in os.listdir(os.path.join(backing, "checkpoints"))
    resumed_outputs = _two_processes("experiments.train", run_on_store, store=store)
    assert "at step 3." in resumed_outputs[0], resumed_outputs[0][-3000:]
    fake_object_store.register(store)
    chex.assert_trees_all_equal(checkpointing.read_workdir_state(url), two_state)
    assert sorted(os.listdir(tmp_path)) == ["resumed_on_one", "store", "two_processes"]  # nothing bypassed it

    eval_outputs = _two_processes("experiments.eval", ["--config=configs/digits.py", f"--workdir={url}",
                                                       "--config.eval.batch_size=64"], store=store)
    assert eval_outputs[0].count("top-1") == 2  # raw and EMA, printed by process 0 only
    assert "top-1" not in eval_outputs[1]
    with open(os.path.join(backing, "eval_results.json")) as f:
        distributed_eval = json.load(f)
    single = _final_eval(resumed)
    assert distributed_eval["num_examples"] == single["num_examples"] == 360
    for key in ("top_1_acc", "ema_top_1_acc", "loss", "ema_loss"):
        assert distributed_eval[key] == pytest.approx(single[key], abs=1e-5), key


def _committed_checkpoints(root: str) -> list[str]:
    """Step folders orbax has finalized (renamed from their temporary name) anywhere under root."""
    return [name for folder, _, _ in os.walk(root) if os.path.basename(folder) == "checkpoints"
            for name in os.listdir(folder) if name.isdigit()]


def _kill_self_at(step: int, store_root: str) -> None:
    """SIGKILLs this process when the runner asks whether to stop at `step`, once an earlier
    checkpoint is committed (saves are asynchronous: without the wait, the kill could come before
    any checkpoint exists and the test would show a fresh start, not a resume)."""
    from nfnets_jax.train import checkpointing  # pylint: disable=import-outside-toplevel

    should_stop = stop_signals.StopRequests.should_stop

    def kill_or_ask(self, current: int) -> bool:
        if current == step:
            deadline = time.time() + 120
            while not _committed_checkpoints(store_root) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return should_stop(self, current)

    stop_signals.StopRequests.should_stop = kill_or_ask


if __name__ == "__main__":
    store_root, kill_at_step, module_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, REPO_ROOT)  # `experiments` and `configs`, as `python -m` from the root has them
    fake_object_store.register(store_root)
    if kill_at_step:
        _kill_self_at(kill_at_step, store_root)
    sys.argv = [module_name, *sys.argv[4:]]
    runpy.run_module(module_name, run_name="__main__", alter_sys=True)
