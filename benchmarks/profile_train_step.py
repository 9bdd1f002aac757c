"""Where the time of one train step (or inference pass) goes, per kind of XLA operation (any backend; the buckets are made for XLA:CPU's trace).

Compiles the runner's real train step (`nfnets_jax.train.one_device_step`, default
`configs/nfnet.py:F0` in float32, batch 8 at 192 px, EMA off: the `benchmarks.compare_timm`
setup), runs `--steps` steps under `jax.profiler.trace`, and sums the time XLA spent in each
instruction of the compiled program. `--pass inference` profiles the eval forward instead
(weights standardised per call, as timm does), `--pass inference_kernels_once` the forward with
every kernel standardised beforehand (`OneDeviceStep.evaluate_with_kernels`): the two inference
columns of `benchmarks.compare_timm`. Every instruction is put in one bucket:

- `conv forward`, `conv dX` (input gradient), `conv dW` (weight gradient): XLA writes a weight
  gradient as a convolution whose window is the whole activation map, which is how it is told
  apart from an input gradient (a kernel-sized window);
- `dot forward` / `dot backward` (1×1 convs as matrix products, the classifier, the squeeze-excite);
- `reduce` (weight-standardisation and AGC statistics, norms);
- `elementwise forward` / `elementwise backward` (fusions: activations, weight standardisation,
  scaling, the optimizer, layout transposes), and `other` (copies, unfused ops).

A fusion counts as the heaviest operation inside it (XLA:CPU fuses convolutions and dots with
elementwise work into library fusions). Events of concurrently running instructions overlap, so
the buckets can add up to more than the step's wall time.

Prints one JSON line: ms per step and share of each bucket, the 15 most expensive instructions
with their shapes and op names, the pass's wall time untraced (median), XLA's FLOP count of the
compiled program and the rate the two give, and the load average. Needs nothing but jax (the trace is read
from the Perfetto JSON that `jax.profiler` writes itself).

    python -m benchmarks.profile_train_step
    python -m benchmarks.profile_train_step --grouped_conv_impl=xla --steps=2
    python -m benchmarks.profile_train_step --pass=inference_kernels_once --steps=3
    python -m benchmarks.profile_train_step --config=configs/nfnet.py:F1 --config.data.image_size=224

`--config` takes a config file[:arg] and `--config.a.b=value` overrides as `experiments.train`
does; `--dtype` sets its compute dtype (default float32, the `benchmarks.compare_timm` setup).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

# XLA:CPU only records per-instruction trace events with this flag; it must be set before jax starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402  pylint: disable=wrong-import-position
import ml_collections  # noqa: E402  pylint: disable=wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

from experiments import command_line  # noqa: E402  pylint: disable=wrong-import-position
from nfnets_jax.runtime import host_memory, provenance  # noqa: E402  pylint: disable=wrong-import-position
from nfnets_jax.models import flops as flops_lib  # noqa: E402  pylint: disable=wrong-import-position
from nfnets_jax.train import one_device_step  # noqa: E402  pylint: disable=wrong-import-position

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WINDOW = re.compile(r"window=\{size=([\dx]+)")


_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """computation name -> its instruction lines."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = None if line.startswith(" ") else _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            bodies[current] = []
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            bodies[current].append(line)
    return bodies


def _bucket(opcode: str, line: str, op_name: str) -> str:
    backward = "transpose(" in op_name
    if opcode == "convolution":
        window = _WINDOW.search(line)
        window_size = 1
        for size in (window.group(1).split("x") if window else []):
            window_size *= int(size)
        if window_size > 9:  # a window over the whole activation map: the weight gradient
            return "conv dW"
        return "conv dX" if backward else "conv forward"
    if opcode == "dot":
        return "dot backward" if backward else "dot forward"
    if opcode == "reduce":
        return "reduce"
    return "elementwise backward" if backward else "elementwise forward"


def classify(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """instruction name -> (bucket, shape, op_name) for every instruction of the compiled HLO.

    A fusion is bucketed by the heaviest operation inside it (convolution, then dot, then
    reduce): XLA:CPU hands convolutions and dots to library fusions (YNNPACK's in jax 0.10) that
    may also hold elementwise work, and the weight-gradient convolutions carry their metadata
    only on the inner instruction.
    """
    bodies = _computations(hlo_text)
    buckets = {}
    for lines in bodies.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            name, shape, opcode = match.groups()
            op_name_match = _OP_NAME.search(line)
            op_name = op_name_match.group(1) if op_name_match else ""
            main_opcode, main_line = opcode, line
            if opcode == "fusion":
                calls = _CALLS.search(line)
                inner = [(m.group(3), l) for l in bodies.get(calls.group(1) if calls else "", [])
                         if (m := _INSTRUCTION.match(l))]
                for heavy in ("convolution", "dot", "reduce"):
                    found = [l for inner_opcode, l in inner if inner_opcode == heavy]
                    if found:
                        main_opcode, main_line = heavy, found[0]
                        break
                if not op_name:
                    inner_name = _OP_NAME.search(main_line)
                    op_name = inner_name.group(1) if inner_name else ""
            elif opcode not in ("convolution", "dot", "reduce"):
                buckets[name] = ("other", shape, op_name)
                continue
            buckets[name] = (_bucket(main_opcode, main_line, op_name), shape, op_name)
    return buckets


def perfetto_trace_path(trace_dir: str) -> str:
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}")
    return paths[0]


def trace_durations(trace_path: str) -> dict[str, float]:
    """Sum of the durations (µs) of every event in the Perfetto trace, by event name."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += float(event.get("dur", 0.0))
    return totals


PASSES = ("train", "inference", "inference_kernels_once")


def _compiled_pass(step: one_device_step.OneDeviceStep, which: str):
    """(the compiled program of pass `which`, a callable that runs it once and waits for it)."""
    state, data = jax.jit(step.init_state)(), step.random_batch()
    if which == "train":
        compiled = step.train.lower(step.abstract_state(), step.batch_shapes).compile()
        carried = [state]  # the train step donates its state: each call consumes the previous one

        def run_train():
            carried[0], _ = jax.block_until_ready(compiled(carried[0], data))

        return compiled, run_train
    if which == "inference":
        args = (state.params, state.model_state, data["images"])
        compiled = step.evaluate.lower(*args).compile()
    elif which == "inference_kernels_once":
        kernels = step.standardized_kernels(state.params, state.model_state)
        args = (state.params, state.model_state, kernels, data["images"])
        compiled = step.evaluate_with_kernels.lower(*args).compile()
    else:
        raise ValueError(f"pass {which!r} is not one of {PASSES}.")
    return compiled, lambda: jax.block_until_ready(compiled(*args))


def profile(config: ml_collections.ConfigDict, config_name: str, batch: int, steps: int, impl: str, dtype: str,
            keep_dir: str | None = None, which: str = "train") -> dict[str, Any]:
    """Traces `steps` calls of pass `which` (one of `PASSES`) of `config`'s model and step at its
    `data.image_size`, in `dtype`, EMA off; with `keep_dir`, also writes the trace and the compiled
    HLO there (`trace.json.gz`, `hlo.txt.gz`) so that a trace from another machine (a GPU) can be
    read later. `config_name` names the config in the record."""
    config = config.copy_and_resolve_references().unlock()
    config.precision.compute_dtype = dtype
    config.optimizer.ema_decay = 0.0
    config.model.kwargs.grouped_conv_impl = impl
    res = config.data.image_size
    step = one_device_step.build(config, batch)
    compiled, run = _compiled_pass(step, which)
    instructions = classify(compiled.as_text())
    run()  # warm-up
    wall = []
    for _ in range(max(3, steps)):
        start = time.perf_counter()
        run()
        wall.append(time.perf_counter() - start)
    wall_s = statistics.median(wall)
    trace_dir = tempfile.mkdtemp(prefix="nfnets_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            run()
    trace_path = perfetto_trace_path(trace_dir)
    if keep_dir:
        os.makedirs(keep_dir, exist_ok=True)
        shutil.copyfile(trace_path, os.path.join(keep_dir, "trace.json.gz"))
        with gzip.open(os.path.join(keep_dir, "hlo.txt.gz"), "wt", encoding="utf-8") as f:
            f.write(compiled.as_text())
    durations = trace_durations(trace_path)
    per_bucket: dict[str, float] = collections.defaultdict(float)
    known = []
    for name, micros in durations.items():
        if name in instructions:
            bucket, shape, op_name = instructions[name]
            per_bucket[bucket] += micros
            known.append((micros, name, bucket, shape, op_name))
    total = sum(per_bucket.values()) or 1.0
    known.sort(reverse=True)
    flops = flops_lib.xla_flops(compiled)
    with open("/proc/loadavg", encoding="ascii") as f:
        load = [float(v) for v in f.read().split()[:3]]
    return {
        "config": config_name, "pass": which, "batch": batch, "res": res, "dtype": dtype,
        "grouped_conv_impl": impl, "steps": steps,
        "wall_ms_per_step": round(wall_s * 1e3, 1),
        "xla_gflop_per_step": None if flops is None else float(f"{flops / 1e9:.4g}"),
        "gflop_per_s": None if flops is None else float(f"{flops / 1e9 / wall_s:.4g}"),
        "instruction_ms_per_step": round(total / 1e3 / steps, 1),
        "buckets": {k: {"ms_per_step": round(v / 1e3 / steps, 1), "share": round(v / total, 3)}
                    for k, v in sorted(per_bucket.items(), key=lambda kv: -kv[1])},
        "top_instructions": [{"name": n, "bucket": b, "shape": s, "op": o[-80:], "ms_per_step": round(m / 1e3 / steps, 1)}
                             for m, n, b, s, o in known[:15]],
        "loadavg": load, "jax": jax.__version__, "backend": jax.default_backend(),
    }


DEFAULT_CONFIG = "nfnet.py:F0"
FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
_CONFIG = command_line.define_config_flag(FLAGS, "whose model and step are profiled", DEFAULT_CONFIG)
flags.DEFINE_integer("batch", 8, "Images per step.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("steps", 1, "Traced passes.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (float32: the compare_timm setup).",
                  flag_values=FLAGS)
flags.DEFINE_enum("grouped_conv_impl", "auto", ["auto", "xla", "split"], "How grouped convolutions are computed "
                  "(nfnets_jax/models/grouped_conv.py).", flag_values=FLAGS)
flags.DEFINE_string("keep", None, "A folder to copy the trace and the compiled HLO into.", flag_values=FLAGS)
flags.DEFINE_enum("pass", "train", list(PASSES), "The train step, or the inference forward with weights "
                  "standardised per call / once.", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], lambda: _CONFIG.value,
                             default_config=command_line.project_config(DEFAULT_CONFIG), flag_values=FLAGS, multihost=False,
                             positional=False)
    args = FLAGS
    host_memory.keep_freed_memory()  # as the runner does on a CPU host (nfnets_jax/runtime/host_memory.py)
    name = pathlib.Path(command_line.config_spec(FLAGS)).name
    print(json.dumps({**profile(_CONFIG.value, name, args.batch, args.steps, args.grouped_conv_impl, args.dtype,
                                  args.keep, args["pass"].value),
                      "provenance": provenance.collect()}),
          flush=True)

if __name__ == "__main__":
    main()
