"""Our NFNet-F0 against timm's `dm_nfnet_f0` (PyTorch) on this machine's CPU, alternately.

Both sides run the same work, one after the other, round by round, in one command, so that both
see the same machine (a shared box's load changes from minute to minute):

- **ours**: the runner's real train step (`nfnets_jax.train.one_device_step` on
  `configs/nfnet.py:F0`): forward, label-smoothed cross-entropy, backward, AGC, coupled weight
  decay, SGD-Nesterov update, float32, the recipe's dropout 0.2 and stochastic depth 0.25; EMA
  off, because timm's step has none. Inference: the eval forward.
- **timm**: `benchmarks/timm_runner.py` under another venv's interpreter (`--timm_python`):
  forward, cross-entropy, backward, timm's AGC, SGD-Nesterov with weight decay, the same dropout
  and drop-path rates. Inference: `model.eval()` under `torch.inference_mode()`.

Our process first applies the runner's host-memory settings (`nfnets_jax/runtime/host_memory.py`: glibc
keeps freed memory, so XLA:CPU's per-step scratch is not zero-filled by the kernel again each
step); `page_faults_per_step` shows their effect on both sides, and `--timm_malloc_like_ours`
gives the timm process the same settings.

It also reports our step's compile time twice: cold (an empty persistent compilation cache) and
as a resumed run sees it (the cache filled by the first compile; `nfnets_jax.runtime.compile_cache`).
Prints one JSON line: medians, images/s, the ratios ours/timm, versions, and for every phase the
CPU time that *other* processes took during it (`others_cores`: a value near 0 means an idle box).

    python -m benchmarks.compare_timm --timm_python=/path/to/timm_venv/bin/python
    python -m benchmarks.compare_timm --rounds=3 --steps=2 --batch=8 --config.data.image_size=224

Our side's model and recipe come from `--config` (default `configs/nfnet.py:F0`, with
`--config.a.b=value` overrides as `experiments.train` takes them), always in float32 and without
EMA, as timm's step runs; timm's side gets its image size and dropout rates.

torch and timm are never dependencies of this package; set up their venv as README, Speed says.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import flags

from benchmarks import host_load
from experiments import command_line
from nfnets_jax.runtime import host_memory, provenance

RUNNER = pathlib.Path(__file__).with_name("timm_runner.py")
TIMM_PYTHON_ENV = "NFNETS_TIMM_PYTHON"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state is field 0)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()


def _process_cpu_seconds(pid: int) -> float:
    fields = _process_stat(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime


def _minor_faults(pid: int) -> int:
    """Pages the kernel had to map in for the process (zero-filled fresh memory, mostly)."""
    return int(_process_stat(pid)[7])


def loadavg() -> list[float]:
    with open("/proc/loadavg", encoding="ascii") as f:
        return [float(v) for v in f.read().split()[:3]]


class Contention:
    """Measures how many cores *other* processes used while a phase ran (0: undisturbed)."""

    def __init__(self, own_pids: list[int]):
        self.own_pids = own_pids

    def __enter__(self) -> Contention:
        self.start = (time.perf_counter(), host_load.busy_cpu_seconds(),
                      sum(map(_process_cpu_seconds, self.own_pids)))
        return self

    def __exit__(self, *exc: Any) -> None:
        wall, busy, own = time.perf_counter(), host_load.busy_cpu_seconds(), sum(map(_process_cpu_seconds, self.own_pids))
        self.others_cores = host_load.others_cores(self.start[1], busy, own - self.start[2],
                                                   max(wall - self.start[0], 1e-9))


class TimmProcess:
    """The timm runner as a child process that waits (idle) between commands."""

    def __init__(self, python: str, extra_env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([python, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": "", **(extra_env or {})})

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"timm runner exited (code {self.proc.wait()}) on {command!r}; see its stderr above.")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"timm runner: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            self.proc.wait(timeout=60)


def check_timm_python(python: str | None) -> str:
    """The interpreter to run timm with; a clear error before any work when it is unusable."""
    if not python:
        command_line.fail(f"pass --timm_python=/path/to/venv/bin/python (or set {TIMM_PYTHON_ENV}): a "
                          "Python with torch and timm (docs/speed.md says how to make that venv).")
    probe = subprocess.run([python, "-c", "import torch, timm"], capture_output=True, text=True, check=False,
                           env={**os.environ, "PYTHONPATH": ""})
    if probe.returncode != 0 and "torchvision" not in probe.stderr:
        command_line.fail(f"{python} cannot import torch and timm:\n{probe.stderr.strip()[-600:]}")
    return python


def _progress(message: str) -> None:
    print(f"[compare_timm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _summary(times: list[float], batch: int) -> dict[str, Any]:
    median = statistics.median(times)
    return {"median_s": round(median, 4), "images_per_s": round(batch / median, 3),
            "step_times_s": [round(t, 4) for t in times]}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


DEFAULT_CONFIG = "nfnet.py:F0"
FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
_CONFIG = command_line.define_config_flag(FLAGS, "of our side, run in float32 without EMA", DEFAULT_CONFIG)
flags.DEFINE_string("timm_python", os.environ.get(TIMM_PYTHON_ENV),
                    f"Python of a venv with torch + timm (default: ${TIMM_PYTHON_ENV}).", flag_values=FLAGS)
flags.DEFINE_string("timm_model", "dm_nfnet_f0", "timm's model name.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 8, "Images per step, both sides.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("rounds", 3, "Alternations of ours / timm.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("steps", 2, "Timed steps per side per round.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("threads", os.cpu_count() or 1, "torch intra-op threads.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("grouped_conv_impl", "auto", ["auto", "xla", "split"], "How our grouped convolutions are computed "
                  "(nfnets_jax/models/grouped_conv.py).", flag_values=FLAGS)
flags.DEFINE_bool("timm_malloc_like_ours", False, "Give the timm process the glibc malloc settings ours runs with "
                  "(nfnets_jax/runtime/host_memory.py), as GLIBC_TUNABLES: a fairness check.", flag_values=FLAGS)
flags.DEFINE_bool("skip_compile_cache", False, "Do not measure the cold vs cached compile time.", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], lambda: _CONFIG.value,
                             default_config=command_line.project_config(DEFAULT_CONFIG), flag_values=FLAGS, multihost=False,
                             positional=False)
    args = FLAGS
    timm_python = check_timm_python(args.timm_python)
    # What the runner does on a CPU host before JAX starts (nfnets_jax/runtime/host_memory.py).
    host_memory_kept = host_memory.keep_freed_memory()

    # One fresh persistent cache for this command: the first compile is cold, the second is what a
    # resumed run (same program, filled cache) pays.
    from nfnets_jax.runtime import compile_cache  # pylint: disable=import-outside-toplevel

    cache_dir = tempfile.mkdtemp(prefix="nfnets_compile_cache_")
    compile_cache.enable(cache_dir)
    import jax  # pylint: disable=import-outside-toplevel

    from nfnets_jax.train import one_device_step  # pylint: disable=import-outside-toplevel

    config = _CONFIG.value.copy_and_resolve_references().unlock()
    config.precision.compute_dtype = "float32"
    config.optimizer.ema_decay = 0.0  # timm's step keeps no EMA
    config.model.kwargs.grouped_conv_impl = args.grouped_conv_impl
    res = config.data.image_size

    def build_and_compile():
        step = one_device_step.build(config, args.batch)
        state_shapes = step.abstract_state()
        start = time.perf_counter()
        compiled = step.train.lower(state_shapes, step.batch_shapes).compile()
        return step, compiled, time.perf_counter() - start

    _progress("compiling our train step (empty compilation cache)")
    step, train, compile_cold_s = build_and_compile()
    compile_cached_s = None
    if not args.skip_compile_cache:
        jax.clear_caches()  # forget the in-memory executable: only the persistent cache is left
        _progress(f"cold compile {compile_cold_s:.1f}s; compiling again as a resumed run would (cache filled)")
        _, train, compile_cached_s = build_and_compile()
    state = jax.jit(step.init_state)()
    batch = step.random_batch()
    evaluate = step.evaluate.lower(state.params, state.model_state, batch["images"]).compile()
    kernels = step.standardized_kernels(state.params, state.model_state)
    evaluate_with_kernels = step.evaluate_with_kernels.lower(
        state.params, state.model_state, kernels, batch["images"]).compile()
    jax.block_until_ready(evaluate_with_kernels(state.params, state.model_state, kernels, batch["images"]))
    del kernels  # each timed phase standardises the weights it runs with

    _progress("compiling the eval forward, starting the timm runner")
    timm_env = {"GLIBC_TUNABLES": host_memory.GLIBC_TUNABLES} if args.timm_malloc_like_ours else None
    timm = TimmProcess(timm_python, timm_env)
    try:
        timm_info = timm.ask(f"setup {args.timm_model} {res} {args.batch} {args.threads} "
                             f"{config.model.kwargs.drop_rate} {config.model.kwargs.stochdepth_rate}")
        timm.ask("train 1")  # warm-up
        timm.ask("infer 1")
        state, _ = jax.block_until_ready(train(state, batch))  # warm-up
        jax.block_until_ready(evaluate(state.params, state.model_state, batch["images"]))

        def ours(phase: str) -> list[float]:
            nonlocal state
            times = []
            # The current weights' kernels, standardised once outside the timed calls.
            current_kernels = (jax.block_until_ready(step.standardized_kernels(state.params, state.model_state))
                               if phase == "infer_kernels_once" else None)
            for _ in range(args.steps):
                start = time.perf_counter()
                if phase == "train":
                    state, _ = jax.block_until_ready(train(state, batch))
                elif phase == "infer":
                    jax.block_until_ready(evaluate(state.params, state.model_state, batch["images"]))
                else:
                    jax.block_until_ready(evaluate_with_kernels(state.params, state.model_state, current_kernels,
                                                                batch["images"]))
                times.append(time.perf_counter() - start)
            return times

        # (phase, side) in the order of a round; timm has no `infer_kernels_once`.
        schedule = [("train", "ours"), ("train", "timm"), ("infer", "ours"), ("infer", "timm"),
                    ("infer_kernels_once", "ours")]
        results: dict[str, dict[str, list[float]]] = {side: {} for side in ("ours", "timm")}
        for phase, side in schedule:
            results[side][phase] = []
        others: dict[str, list[float]] = {f"{side}_{phase}": [] for phase, side in schedule}
        faults: dict[str, list[int]] = {key: [] for key in others}
        pids = [os.getpid(), timm.proc.pid]
        for round_index in range(args.rounds):
            _progress(f"round {round_index + 1}/{args.rounds}")
            for phase, side in schedule:
                time.sleep(0.3)  # let the other side's worker threads stop spinning
                pid = pids[0] if side == "ours" else pids[1]
                faults_before = _minor_faults(pid)
                with Contention(pids) as contention:
                    times = ours(phase) if side == "ours" else timm.ask(f"{phase} {args.steps}")["times_s"]
                faults[f"{side}_{phase}"].append((_minor_faults(pid) - faults_before) // args.steps)
                results[side][phase] += times
                others[f"{side}_{phase}"].append(round(contention.others_cores, 2))
    finally:
        timm.close()

    record: dict[str, Any] = {
        "benchmark": "compare_timm",
        "setup": {"config": pathlib.Path(command_line.config_spec(FLAGS)).name, "timm_model": args.timm_model, "res": res,
                  "batch": args.batch, "dtype": "float32", "rounds": args.rounds, "steps_per_round": args.steps,
                  "grouped_conv_impl": args.grouped_conv_impl, "torch_threads": args.threads,
                  "timm_malloc_like_ours": args.timm_malloc_like_ours},
        "ours": {phase: _summary(times, args.batch) for phase, times in results["ours"].items()},
        "timm": {phase: _summary(times, args.batch) for phase, times in results["timm"].items()},
    }
    timm_rate = {phase: record["timm"][phase]["images_per_s"] for phase in ("train", "infer")}
    record["ratio_ours_over_timm"] = {
        "train": round(record["ours"]["train"]["images_per_s"] / timm_rate["train"], 3),
        "infer": round(record["ours"]["infer"]["images_per_s"] / timm_rate["infer"], 3),
        # Ours with the kernels standardised once, over timm's eval forward (which standardises per call).
        "infer_kernels_once": round(record["ours"]["infer_kernels_once"]["images_per_s"] / timm_rate["infer"], 3)}
    record["compile_s"] = {"cold": round(compile_cold_s, 2),
                           "resumed_with_cache": None if compile_cached_s is None else round(compile_cached_s, 2)}
    record["others_cores_per_phase"] = others
    record["page_faults_per_step"] = faults
    record["host_memory_kept"] = host_memory_kept
    record["loadavg_end"] = loadavg()
    record["machine"] = {"cpu": _cpu_name(), "cores": os.cpu_count(), "backend": jax.default_backend()}
    record["timm_side_versions"] = timm_info["versions"]  # ours are in record["provenance"]
    record["timm_num_params"] = timm_info["num_params"]
    record["provenance"] = provenance.collect()
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
