"""What a train step costs on a TPU by the TPU compiler's own performance model, without a TPU.

libtpu's compiler (the `tpu-plan` extra, as in `experiments.memory_plan --target`) compiles a
program for one TPU device *deviceless*, and the compiled executable's cost analysis carries the
compiler's own estimate of its run time, `optimal_seconds`, beside the FLOPs and the bytes its ops
read and write in HBM. This benchmark compiles, per config and TPU target:

    step          the runner's train step (`train.one_device_step`: the step `experiments.train`
                  compiles, with its device means, non-finite guard, metrics and EMA)
    step_state    the same step with its metrics dropped (XLA removes what computes only them)
    bare          loss -> gradient -> the same optax chain -> EMA, and nothing else
    fwd_bwd       the model's forward and backward alone: compute-dtype params in, label-smoothed
                  cross-entropy, gradients summed over the (one-device) mesh out
    forward       the training forward alone (logits)

and prints one JSON line per config and target with each program's estimate (ms), FLOPs, bytes
accessed, peak memory (XLA's memory analysis) and compile time, and the runner's extras over the
bare step attributed by difference: `step − step_state` is what its metrics cost, `step_state −
bare` its guard, device means and RNG folding.

    python -m benchmarks.tpu_step_estimate                                    # F0–F6, every target
    python -m benchmarks.tpu_step_estimate --only nfnet.py:F0 --targets tpu-v3
    python -m benchmarks.tpu_step_estimate --config=configs/nfnet.py:F0 --config.data.image_size=224 \
        --targets tpu-v3                                                    # one config, with overrides
    python -m benchmarks.tpu_step_estimate --only nfnet.py:F1 --targets tpu-v5p --programs step,bare \
        --compile_repeats 3                     # compile each 3 times, alternating: median compile times
    python -m benchmarks.tpu_step_estimate --table docs/tpu_step_cost.jsonl   # JSON lines -> Markdown
    python -m benchmarks.tpu_step_estimate --table docs/tpu_step_cost.jsonl --into docs/tpu_step_cost.md

`--table` renders both generated sections of that page: this benchmark's rows, and our step against
DeepMind's, from rows of DeepMind's own step kept in the same JSON lines (marked
`"code": "deepmind-research/nfnets"`; the page says how they were compiled, outside this repository).

How to read it (docs/tpu_step_cost.md): the estimate is a roofline-style model of the compiled
program, not a wall time (the paper measured 73.3 ms per F0 step on a TPUv3), so compare programs
with each other under it. A target's estimate is only used where it is plausible: positive and no
faster than the program's FLOPs at the device's bf16 peak; libtpu 0.0.42.1's TPUv4 megacore gives
negative estimates, and such a target is reported as "no estimate", never as a ratio.

Choices that differ per platform (grouped and 1×1 convolutions, recomputing activations in the
backward pass) are made for the platform the program is lowered for (`jax.lax.platform_dependent`
in `models.grouped_conv` and `models.layers`), so a TPU compile from this CPU host gets the TPU's;
each row records them. The recipe's per-device batch is the memory plan's (NFNets: 4096 over 128
devices); `--remat auto` (default) turns on per-block remat where the runner's step does not fit
the target's memory with the plan's headroom, as the recipes do on a TPUv3 core for F4–F6.

Each config and target runs in a fresh process, one at a time: a full-size deviceless compile
takes minutes and several GB of host memory (F0: ~3 min and ~8 GB per program on 2 cores; F5–F6
up to ~10 min and ~24 GB).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from benchmarks import host_load
from experiments import command_line, generated_section, memory_plan
from nfnets_jax.runtime import provenance

PROGRAMS = ("step", "step_state", "bare", "fwd_bwd", "forward")
DEFAULT_SPECS = tuple(f"nfnet.py:F{k}" for k in range(7))

def estimate_problem(optimal_seconds: float | None, flops: float | None, peak_tflops: float) -> str | None:
    """Why a compiler's run-time estimate cannot be used (None when it can).

    A usable estimate exists, is finite and positive, and is no faster than the program's FLOPs
    at the device's peak: a roofline model can only add time to that bound.
    """
    if optimal_seconds is None:
        return "the compiler gave no run-time estimate"
    if not math.isfinite(optimal_seconds) or optimal_seconds <= 0:
        return f"the compiler's estimate is {optimal_seconds:.3g} s"
    if flops:
        floor = flops / (peak_tflops * 1e12)
        if optimal_seconds < floor:
            return (f"the compiler's estimate ({optimal_seconds * 1e3:.3g} ms) is below the program's FLOPs "
                    f"at peak ({floor * 1e3:.3g} ms)")
    return None


def runner_extras(programs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The runner's step over the bare step, in estimated ms, split by the programs' differences:
    `metrics` = step − step_state, `guard_means_rng` = step_state − bare, and `ratio` = step / bare.
    Each is None where one of its two programs has no estimate (or was not compiled: `--programs
    step,bare` gives the ratio alone)."""
    ms = {name: (programs.get(name) or {}).get("estimate_ms") for name in ("step", "step_state", "bare")}
    difference = lambda a, b: None if ms[a] is None or ms[b] is None else ms[a] - ms[b]
    return {"ratio": None if difference("step", "bare") is None else ms["step"] / ms["bare"],
            "extra_ms": difference("step", "bare"), "metrics_ms": difference("step", "step_state"),
            "guard_means_rng_ms": difference("step_state", "bare")}


def platform_choices(config: Any, platform: str) -> dict[str, Any]:
    """How the model computes when compiled for `platform` (never what): read from the policies the
    model itself applies, so the table says which were used."""
    from nfnets_jax.models import grouped_conv, layers  # pylint: disable=import-outside-toplevel

    impl = config.model.kwargs.get("grouped_conv_impl", "auto")
    return {
        "grouped_conv_impl": impl,
        "grouped_convs_as": grouped_conv.resolve_impl(impl, 2, platform),  # NFNets have 1–8 groups
        "activation_backward": ("recomputed (jax.checkpoint)" if platform in layers.RECOMPUTE_ACTIVATIONS_ON
                                else "XLA's choice"),
        "weight_standardisation_derivative": "hand-written JVP (every platform)",
        "weight_standardisation_statistics": ("on [fan_in, out] rows" if platform in layers.STANDARDIZE_ON_ROWS_ON
                                              else "over the kernel's axes, pinned to the parameters' layout"),
    }


def bare_train_step(forward, optimizer, settings) -> Callable:
    """loss -> gradient -> the optimizer -> EMA, nothing else: the reference the runner's step is
    compared with (no device means, no non-finite guard, no metrics, the state's key used as is).
    The loss and the casts are the runner's (`train.step.make_train_step`): params cast to the
    compute dtype for the forward, logits back to float32, label-smoothed cross-entropy on the
    MixUp/CutMix targets."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel

    from nfnets_jax import losses  # pylint: disable=import-outside-toplevel
    from nfnets_jax.optim import ema as ema_lib  # pylint: disable=import-outside-toplevel

    def loss_fn(params, model_state, rng, images, targets):
        compute_params = jax.tree.map(lambda p: p.astype(settings.compute_dtype), params)
        logits, _ = forward.apply(compute_params, model_state, rng, images.astype(settings.compute_dtype),
                                  is_training=True)
        return jnp.mean(losses.softmax_cross_entropy(logits.astype(jnp.float32), targets, settings.label_smoothing))

    def step(state, batch):
        targets = losses.mixed_targets(batch["labels"], batch["mix_labels"], batch["ratio"], settings.num_classes)
        grads = jax.grad(loss_fn)(state.params, state.model_state, state.rng, batch["images"], targets)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if settings.ema_decay is not None and ema_params is not None:
            ema_params = ema_lib.ema_update(ema_params, params, state.step, settings.ema_decay)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)

    return step


def build_programs(step) -> dict[str, tuple[Callable, tuple]]:
    """name -> (jitted program, abstract arguments) for every entry of PROGRAMS, all over the same
    one-device mesh as the runner's step (`step`: a `train.one_device_step.OneDeviceStep`); the
    steps are wrapped as the runner wraps its own (`step.backend.wrap_train`, state donated), the
    forward and forward + backward as it wraps its eval step (`step.backend.wrap_eval`)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from nfnets_jax import losses  # pylint: disable=import-outside-toplevel
    from nfnets_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

    axis, settings = step_lib.AXIS_NAME, step.settings
    state = step.abstract_state()
    images, labels = step.batch_shapes["images"], step.batch_shapes["labels"]
    compute_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, settings.compute_dtype), state.params)

    def logits(params, model_state, batch_images):
        out, _ = step.forward.apply(params, model_state, jax.random.PRNGKey(0),
                                    batch_images.astype(settings.compute_dtype), is_training=True)
        return out.astype(jnp.float32)

    def summed_grads(params, model_state, batch):
        targets = jax.nn.one_hot(batch["labels"], step.num_classes, dtype=jnp.float32)
        loss = lambda p: jnp.mean(losses.softmax_cross_entropy(
            logits(p, model_state, batch["images"]), targets, settings.label_smoothing))
        return jax.lax.psum(jax.grad(loss)(params), axis)

    bare = bare_train_step(step.forward, step.optimizer, settings)
    return {
        "step": (step.train, (state, step.batch_shapes)),
        "step_state": (jax.jit(lambda s, b: step.train(s, b)[0], donate_argnums=(0,)), (state, step.batch_shapes)),
        "bare": (step.backend.wrap_train(lambda s, b: (bare(s, b), {})), (state, step.batch_shapes)),
        # the runner's eval wrapping: (params, model state) replicated, the batch split, one output
        "fwd_bwd": (step.backend.wrap_eval(summed_grads),
                    (compute_params, state.model_state, {"images": images, "labels": labels})),
        "forward": (step.backend.wrap_eval(logits), (compute_params, state.model_state, images)),
    }


def measure_program(program: Callable, args: tuple) -> dict[str, Any]:
    """Compiles `program` for its abstract `args` and reads the compiled executable's analyses
    (`models.flops.xla_cost`, `analysis.compiled_memory`); a TPU compiler's refusal to fit
    the device is recorded, not raised."""
    import jax  # pylint: disable=import-outside-toplevel

    from nfnets_jax.analysis.compiled_memory import compiled_memory  # pylint: disable=import-outside-toplevel
    from nfnets_jax.models.flops import xla_cost  # pylint: disable=import-outside-toplevel

    start, start_cpu, start_host = time.perf_counter(), time.process_time(), host_load.busy_cpu_seconds()
    try:
        compiled = program.lower(*args).compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {"refused": str(error).strip().splitlines()[0][:400], "compile_s": time.perf_counter() - start}
    # Wall time, and this process's CPU time (all threads), which other jobs on a shared host
    # disturb far less.
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    # the other work beside it: a compile beside another took up to a quarter more CPU seconds here
    # (docs/tpu_step_cost_log.md)
    others = host_load.others_cores(start_host, host_load.busy_cpu_seconds(), compile_cpu_s, compile_s)
    cost, memory = xla_cost(compiled), compiled_memory(compiled)
    seconds = cost["optimal_seconds"]
    return {"estimate_ms": None if seconds is None else seconds * 1e3, "flops": cost["flops"],
            "bytes_accessed": cost["bytes_accessed"], "peak_gib": memory.peak_gib,
            "compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "others_cores": others}


def programs_for(config: Any, batch: int, device: Any, use_remat: bool) -> dict[str, tuple[Callable, tuple]]:
    """`build_programs` of `config`'s runner step for `batch` images on `device`, per-block remat on or off
    (sets `config.train.remat`)."""
    from nfnets_jax.train import one_device_step  # pylint: disable=import-outside-toplevel

    config.train.remat = use_remat
    return build_programs(one_device_step.build(config, batch, device=device))


def _fits(result: dict[str, Any], target: str) -> bool:
    return "refused" not in result and memory_plan.fits_target(result["peak_gib"], target)


def estimate(spec: str, target: str, *, per_device_batch: int | None, remat: str,
             programs: Sequence[str] = PROGRAMS, config: Any = None,
             measure_alone: Callable[[str, bool], dict[str, Any]] | None = None,
             compile_repeats: int = 1) -> dict[str, Any]:
    """One JSON row: every program of `spec` compiled for one device of `target` (deviceless).
    `config`: the config to compile (a `--config` with its overrides, `spec` being its
    `memory_plan.config_label`); default: `spec`'s from configs/. `measure_alone(program, remat)`,
    where given, measures each program in a process of its own (the command line's way: a compile
    that follows another in the same process runs warm, see `_measure_in_child`); None compiles
    them all here, one after the other. `compile_repeats` > 1 compiles the runner's and the bare step
    that many times each (`_repeat_compiles`; needs `measure_alone`)."""
    if compile_repeats > 1 and measure_alone is None:
        raise ValueError("compile_repeats > 1 needs measure_alone: a compile repeated in one process runs warm.")
    tpu = memory_plan.TPU_TARGETS[target]
    device = memory_plan.target_device(tpu)
    config, batch = memory_plan.planned_config(spec, config, per_device_batch)

    def compile_all(use_remat: bool, names: Sequence[str], done: dict[str, Any]) -> dict[str, Any]:
        built = None if measure_alone else programs_for(config, batch, device, use_remat)
        results = dict(done)
        for name in names:
            if name not in results:
                results[name] = measure_alone(name, use_remat) if built is None else measure_program(*built[name])
        return results

    use_remat = remat == "on"
    results = compile_all(use_remat, ["step"], {})
    if remat == "auto" and not _fits(results["step"], target):
        use_remat = True
        results = compile_all(use_remat, ["step"], {})
    step = results["step"]
    problem = step.get("refused") or estimate_problem(
        None if step["estimate_ms"] is None else step["estimate_ms"] / 1e3, step["flops"], tpu.peak_bf16_tflops)
    if problem is None:  # a target without a usable estimate is not compiled further
        results = compile_all(use_remat, programs, results)
        if compile_repeats > 1 and "bare" in results:
            _repeat_compiles(results, compile_repeats, lambda name: measure_alone(name, use_remat))
    run_provenance = provenance.collect(devices=False)  # versions (libtpu too), commit, machine
    return {
        "config": spec, "model": config.model.name, "target": target, "device": device.device_kind,
        "image_size": config.data.image_size, "per_device_batch": batch,
        "compiled_in": ALONE if measure_alone else "one process",
        "compute_dtype": config.precision.compute_dtype, "remat": use_remat,
        "choices": platform_choices(config, device.platform),
        "estimate_valid": problem is None, "no_estimate_because": problem,
        "programs": results, "runner_over_bare": runner_extras(results) if problem is None else None,
        "jax": run_provenance["versions"]["jax"], "libtpu": run_provenance["versions"]["libtpu"],
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "provenance": run_provenance,
    }


COMPILE_TIMES = ("compile_s", "compile_cpu_s", "others_cores")  # what `measure_program` times, and the load beside it


def _repeat_compiles(results: dict[str, Any], repeats: int, measure: Callable[[str], dict[str, Any]]) -> None:
    """Compiles the runner's and the bare step again, each in a fresh process, until each has
    `repeats` compile times (`<time>_runs` beside the first, which `estimate` took: step, bare).

    One compile of the same program moved by a fifth between sittings on a shared host
    (docs/tpu_step_cost_log.md), so one pair does not settle a 1.1x ratio. The order alternates in
    balanced pairs (step, bare | bare, step | step, bare | ...) so that a drift over the sitting
    (other jobs starting or ending) weighs on both programs alike."""
    for name in ("step", "bare"):
        for key in COMPILE_TIMES:
            if results[name].get(key) is not None:
                results[name][key + "_runs"] = [results[name][key]]
    for round_ in range(1, repeats):
        for name in (("bare", "step") if round_ % 2 else ("step", "bare")):
            again = measure(name)
            for key in COMPILE_TIMES:
                if key + "_runs" in results[name] and again.get(key) is not None:
                    results[name][key + "_runs"].append(again[key])


def compile_time(program: dict[str, Any], key: str) -> float | None:
    """A program's compile time `key` ("compile_s" or "compile_cpu_s"): the median of its repeated
    compiles where there are some (`_repeat_compiles`), else its one compile's."""
    runs = program.get(key + "_runs")
    return statistics.median(runs) if runs else program.get(key)


# ---- The Markdown table of docs/tpu_step_cost.md, from the JSON lines ----

RUNNER_OVER_BARE_TARGET = 1.02  # issue's goal: the runner's extras cost at most 2% of the bare step
COMPILE_OVER_BARE_TARGET = 1.1  # and the runner's step compiles in at most 1.1x the bare step's time


# Rows of DeepMind's own step (deepmind-research `nfnets/experiment.py:_train_fn`, compiled the same way
# outside this repository; docs/tpu_step_cost.md says how) sit in the same JSON lines, marked so.
DEEPMIND = "deepmind-research/nfnets"
OURS_OVER_DEEPMIND_TARGETS = (1.00, 0.95)  # the goal, then its stretch goal


def is_deepmind(row: dict[str, Any]) -> bool:
    """Whether a row measures DeepMind's step rather than this benchmark's programs."""
    return row.get("code") == DEEPMIND


def _last_of_each(rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], tuple]) -> list[dict[str, Any]]:
    """The last of `rows` for each `key`, in the order of the configs, targets and (largest first)
    batches: a row compiled again replaces the earlier one on the page (the JSON lines keep both)."""
    last = {key(row): row for row in rows}
    return sorted(last.values(), key=lambda row: (memory_plan.spec_order(row["config"]),
                                                  memory_plan.target_order(row["target"]), -row["per_device_batch"]))


ADDED_LATER = ("step_state", "fwd_bwd", "forward")  # programs a later row may add to a row


def _row_key(row: dict[str, Any]) -> tuple:
    return row["config"], row["target"], row["per_device_batch"], row["remat"]


def latest_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our row for each (config, target, batch, remat); DeepMind's rows are left out
    (`latest_deepmind_rows`).

    The row shown is the last that compiled both the runner's and the bare step (else the last),
    so that their ratio and compile times come from one sitting: re-running a row replaces it.
    A program of ADDED_LATER that it lacks is taken from the last row of the same key that
    compiled it with the same implementation choices (`--programs step,fwd_bwd` adds the
    forward + backward to a row without compiling its bare step again); the row then says where
    each such program came from (`added_from`: program -> date and commit), and the table marks it."""
    ours = [row for row in rows if not is_deepmind(row)]
    both = lambda row: {"step", "bare"} <= set(row.get("programs") or {})
    shown = {}
    for row in ours:
        if both(row) or not both(shown.get(_row_key(row), {})):
            shown[_row_key(row)] = row
    merged = []
    for key, row in shown.items():
        row = {**row, "programs": dict(row["programs"]), "added_from": {}}
        for later in ours:
            if (_row_key(later) != key or later is shown[key] or later.get("choices") != row.get("choices")
                    or not later["estimate_valid"]):
                continue
            for name in ADDED_LATER:
                if name in later["programs"] and name not in shown[key]["programs"]:  # the last such row wins
                    row["programs"][name] = later["programs"][name]
                    row["added_from"][name] = f"{later['date']}, {provenance.short_commit((later.get('provenance') or {}).get('git'))}"
        merged.append(row)
    return _last_of_each(merged, _row_key)


def runner_over_bare_ratios(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[float]]:
    """The rows with both the runner's and the bare step's estimate, and their ratio as printed."""
    measured = [row for row in rows if row["estimate_valid"] and (row["runner_over_bare"] or {}).get("ratio")]
    return measured, [round(row["runner_over_bare"]["ratio"], 3) for row in measured]


def summary(rows: Sequence[dict[str, Any]]) -> str:
    """What the rows say about the runner's extras: the range of runner / bare, and each row above
    the target with its split into metrics and the rest where `step_state` was compiled."""
    measured, ratios = runner_over_bare_ratios(rows)
    if not measured:
        return "No row has both the runner's and the bare step's estimate yet."
    above = [row for row, ratio in zip(measured, ratios) if ratio > RUNNER_OVER_BARE_TARGET]
    text = (f"The runner's step over the bare step: {generated_section.value_range(ratios, '{:.3f}×')} over the "
            f"{len(measured)} row{'s' if len(measured) > 1 else ''} with both estimates; ")
    if not above:
        return text + f"none is above the {RUNNER_OVER_BARE_TARGET:.2f}× target."
    said = []
    for row in above:
        extras = row["runner_over_bare"]
        split = ("; split not compiled: add step_state to --programs" if extras["metrics_ms"] is None else
                 f"; metrics {extras['metrics_ms']:+.2f} ms, guard, means and RNG {extras['guard_means_rng_ms']:+.2f} ms")
        said.append(f"{row['config']} on {row['target']} at {row['per_device_batch']} per device"
                    f"{', remat on' if row['remat'] else ''} {extras['ratio']:.3f}× ({extras['extra_ms']:+.2f} ms{split})")
    return text + f"above the {RUNNER_OVER_BARE_TARGET:.2f}× target: " + "; ".join(said) + "."


def compile_seconds(step: dict[str, Any], bare: dict[str, Any]) -> tuple[float, float, str] | None:
    """(runner's step, bare step, what was timed) compile times of one row (`compile_time`: medians
    where the compiles were repeated): the process's CPU seconds where both were recorded (other jobs
    on a shared host disturb them far less), else both wall times; None where either program has
    neither (refused, not compiled)."""
    key = _compile_key(step, bare)
    return None if key is None else (compile_time(step, key), compile_time(bare, key), COMPILE_UNITS[key])


COMPILE_UNITS = {"compile_cpu_s": "CPU s", "compile_s": "s"}  # preferred first (`compile_seconds`)


def _compile_key(step: dict[str, Any], bare: dict[str, Any]) -> str | None:
    return next((key for key in COMPILE_UNITS if step.get(key) is not None and bare.get(key) is not None), None)


def pair_ratios(step: dict[str, Any], bare: dict[str, Any]) -> list[float]:
    """The runner's step over the bare step's compile time in each pair of repeated compiles
    (`_repeat_compiles`), in the unit `compile_seconds` uses; empty where they were not repeated."""
    key = _compile_key(step, bare)
    runs = [program.get(f"{key}_runs") or [] for program in (step, bare)] if key else [[], []]
    if min(len(r) for r in runs) < 2:
        return []
    return [s / b for s, b in zip(*runs)]


ALONE = "a process per program"  # how a row's programs were compiled (`estimate`'s "compiled_in")


def compared_compile_times(rows: Sequence[dict[str, Any]]) -> tuple[list[tuple], int]:
    """(row, runner's step, bare step, unit, their ratio as printed) for each row whose two steps were
    each compiled in a process of their own, and how many older rows compiled them in one process."""
    timed, shared = [], 0
    for row in rows:
        programs = row["programs"]
        times = compile_seconds(programs["step"], programs["bare"]) if "bare" in programs else None
        if times is not None and row.get("compiled_in") != ALONE:
            shared += 1
        elif times is not None:
            timed.append((row, *times, round(times[0] / times[1], 2)))
    return timed, shared


def compile_summary(rows: Sequence[dict[str, Any]]) -> str:
    """What the rows say about compile time: the runner's step over the bare step's, its range and
    each row above COMPILE_OVER_BARE_TARGET, over the rows whose programs were each compiled in a
    process of their own. Older rows compiled them one after another in one process, the runner's
    step first, which is slower for being first (`_measure_in_child`): they are counted, not compared."""
    timed, shared = compared_compile_times(rows)
    pairs = {id(row): pair_ratios(row["programs"]["step"], row["programs"]["bare"]) for row, *_ in timed}
    left_out = ("" if not shared else
                f" {shared} older row{'s' if shared > 1 else ''}, whose programs were compiled one after another in "
                f"one process (the runner's step first), {'are' if shared > 1 else 'is'} not compared.")
    if not timed:
        return "No row has both programs' compile times, each from a process of its own, yet." + left_out
    text = (f"Compile time of the runner's step over the bare step's (each compiled in a process of its own; CPU "
            f"seconds where both were recorded, else wall seconds): "
            f"{generated_section.value_range([t[-1] for t in timed], '{:.2f}×')} over the "
            f"{len(timed)} row{'s' if len(timed) > 1 else ''} with both; ")
    row_said = lambda row, step, bare, said, ratio: (
        f"{row['config']} on {row['target']}{', remat on' if row['remat'] else ''} {ratio:.2f}× "
        f"({step:.0f} / {bare:.0f} {said}{_pairs_said(pairs[id(row)])}{_others_said(row)})")
    above = [row_said(*entry) for entry in timed if entry[-1] > COMPILE_OVER_BARE_TARGET]
    repeated = [row_said(*entry) for entry in timed if pairs[id(entry[0])] and entry[-1] <= COMPILE_OVER_BARE_TARGET]
    within = "" if not repeated else " Compiled repeatedly: " + "; ".join(repeated) + "."
    if not above:
        return text + f"none is above the {COMPILE_OVER_BARE_TARGET:.1f}× target." + within + left_out
    return (text + f"above the {COMPILE_OVER_BARE_TARGET:.1f}× target: " + "; ".join(above) + "." + within
            + left_out)


def busiest_others(row: dict[str, Any]) -> float | None:
    """The most other work (`others_cores`) beside any compile of the row's two steps; None where
    none was recorded (rows before 2026-12-07)."""
    values = [value for name in ("step", "bare")
              for value in (row["programs"][name].get("others_cores_runs") or [row["programs"][name].get("others_cores")])
              if value is not None]
    return max(values) if values else None


def _others_said(row: dict[str, Any]) -> str:
    busiest = busiest_others(row)
    return "" if busiest is None else f"; other work beside it: up to {busiest:.1f} cores"


def _pairs_said(ratios: list[float]) -> str:
    """How a repeated row's pairs spread: the ratio's range over the pairs, and whether every pair,
    none or only some are above COMPILE_OVER_BARE_TARGET (only then is the median's side of it settled)."""
    if not ratios:
        return ""
    printed = [round(r, 2) for r in ratios]
    over = sum(r > COMPILE_OVER_BARE_TARGET for r in printed)
    side = ("every pair above the target" if over == len(printed) else
            "no pair above the target" if not over else f"{over} of {len(printed)} pairs above the target")
    return (f", medians of {len(printed)} compiles each, alternating; pairs "
            f"{generated_section.value_range(printed, '{:.2f}×')}, {side}")


def render(rows: Sequence[dict[str, Any]]) -> str:
    """The page's generated section: the table of the latest rows, then the summaries of the
    runner's extras and of compile time."""
    latest = latest_rows(rows)
    return (markdown_table(latest) + "\n\n" + summary(latest) + "\n\n" + compile_summary(latest)
            + added_later_note(latest))


def _dagger(row: dict[str, Any] | None, program: str) -> str:
    """"†" where `program`'s cell of `row` came from another row (`latest_rows`), else ""."""
    return "†" if program in ((row or {}).get("added_from") or {}) else ""


def added_later_note(rows: Sequence[dict[str, Any]]) -> str:
    """The footnote for the table's † cells: programs compiled in another row than the row's
    runner's and bare step (`latest_rows`), with that row's date and commit."""
    by_origin: dict[str, list[str]] = {}
    for row in rows:
        for name, origin in (row.get("added_from") or {}).items():
            by_origin.setdefault(origin, []).append(f"{name} of {row['config']} on {row['target']}")
    if not by_origin:
        return ""
    return ("\n\n† Compiled in another row than the row's runner's and bare step, with the same implementation "
            "choices: " + "; ".join(f"{', '.join(cells)} ({origin})" for origin, cells in sorted(by_origin.items()))
            + ".")


def goals(rows: Sequence[dict[str, Any]]) -> str:
    """The page's verdicts, one line per goal of the step's cost (the targets above): what it asks,
    what the rows measure, and whether it is met, with the configs and targets that miss it."""
    latest = latest_rows(rows)
    name = lambda key: f"{key[0].split(':')[-1]} on {key[1]}"
    goal, stretch = OURS_OVER_DEEPMIND_TARGETS
    lines = ["| goal | measured | met? |", "|---|---|---|"]

    def line(asked: str, values: list[float], fmt: str, over: tuple[str, str], keys: list, target: float,
             within: list | None = None) -> None:
        if not values:
            lines.append(f"| {asked} | not measured | — |")
            return
        missed = [f"{name(key)} {value:{fmt}}×" for key, value in zip(keys, values) if value > target]
        verdict = (f"**no**: {len(missed)} of {len(values)} above ({'; '.join(missed)})" if missed else
                   f"yes, all {len(values)}" if len(values) > 1 else "yes")
        if within is not None:
            verdict += f"; at or below {stretch:.2f}×: {len(within)} ({', '.join(within) or 'none'})"
        lines.append(f"| {asked} | {generated_section.value_range(values, '{:' + fmt + '}×')} over {len(values)} "
                     f"{over[len(values) > 1]} | {verdict} |")

    for program, what in (("step", "the whole train step"), ("fwd_bwd", "the forward + backward")):
        ratios = over_deepmind_ratios(rows, program)
        within = [name(key) for key, ratio in ratios if ratio <= stretch] if program == "step" else None
        asked = f"ours / DeepMind's, {what}: ≤ {goal:.2f}×" + (f" (stretch ≤ {stretch:.2f}×)" if within is not None else "")
        line(asked, [ratio for _, ratio in ratios], ".3f", ("config × target", "configs × targets"), [key for key, _ in ratios], goal,
             within)
    measured, ratios = runner_over_bare_ratios(latest)
    line(f"the runner's step / the bare step: ≤ {RUNNER_OVER_BARE_TARGET:.2f}×", ratios, ".3f", ("row", "rows"),
         [(row["config"], row["target"]) for row in measured], RUNNER_OVER_BARE_TARGET)
    timed, _ = compared_compile_times(latest)
    line(f"compile time, the runner's step / the bare step's: ≤ {COMPILE_OVER_BARE_TARGET:.1f}×",
         [entry[-1] for entry in timed], ".2f", ("row", "rows"), [(entry[0]["config"], entry[0]["target"]) for entry in timed],
         COMPILE_OVER_BARE_TARGET)
    return "\n".join(lines)


def render_sections(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Every generated section of docs/tpu_step_cost.md (name -> text) from its JSON lines."""
    return {GOALS_SECTION: goals(rows), SECTION: render(rows), DEEPMIND_SECTION: deepmind_comparison(rows)}


def latest_deepmind_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last DeepMind row of each (config, target, batch)."""
    return _last_of_each([row for row in rows if is_deepmind(row)],
                         lambda row: (row["config"], row["target"], row["per_device_batch"]))


def ours_over_deepmind(ours: dict[str, Any] | None, deepmind: dict[str, Any], program: str) -> float | None:
    """Our program's estimate over DeepMind's, where both were compiled without remat (DeepMind's
    code has none, so a remat step of ours is not the same computation) with valid estimates."""
    if ours is None or ours["remat"] or not ours["estimate_valid"]:
        return None
    mine = (ours["programs"].get(program) or {}).get("estimate_ms")
    theirs = (deepmind["programs"].get(program) or {}).get("estimate_ms")
    return None if mine is None or theirs is None else mine / theirs


def beside_deepmind(rows: Sequence[dict[str, Any]]) -> list[tuple[tuple, dict[str, Any], dict[str, Any] | None]]:
    """(config, target, batch), DeepMind's row and ours (None: not compiled) for each of DeepMind's
    latest rows; ours is the row without remat where there is one."""
    ours_of: dict[tuple, dict[str, Any]] = {}
    for row in latest_rows(rows):
        key = (row["config"], row["target"], row["per_device_batch"])
        if key not in ours_of or ours_of[key]["remat"]:
            ours_of[key] = row
    return [((theirs["config"], theirs["target"], theirs["per_device_batch"]), theirs,
             ours_of.get((theirs["config"], theirs["target"], theirs["per_device_batch"])))
            for theirs in latest_deepmind_rows(rows)]


def over_deepmind_ratios(rows: Sequence[dict[str, Any]], program: str) -> list[tuple[tuple, float]]:
    """(config, target, batch) and ours over DeepMind's `program` as printed, where both have it."""
    ratios = [(key, ours_over_deepmind(ours, theirs, program)) for key, theirs, ours in beside_deepmind(rows)]
    return [(key, round(ratio, 3)) for key, ratio in ratios if ratio is not None]


def deepmind_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """The table of our step against DeepMind's, per config and target DeepMind's step was compiled
    for, and what it says about the targets (OURS_OVER_DEEPMIND_TARGETS). Our row without remat is
    compared where there is one; a remat row of ours is shown, marked, without a ratio; a step of
    DeepMind's that the compiler refused (more than the device's HBM) reads "does not fit"."""
    head = ("| config | target | px | batch | DeepMind's step (ms) | ours (ms) | ours / DeepMind's | "
            "DeepMind's fwd+bwd (ms) | ours (ms) | ours / DeepMind's | step GB accessed, DeepMind's / ours | "
            "DeepMind's compiled |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ratios, fwd_bwd_ratios = over_deepmind_ratios(rows, "step"), over_deepmind_ratios(rows, "fwd_bwd")
    refused, remat_only, only_ours_fit = [], [], []
    program = lambda row, name: (row or {}).get("programs", {}).get(name) or {}
    for key, theirs, ours in beside_deepmind(rows):
        ms = lambda row, name: _number(program(row, name).get("estimate_ms"), "{:.2f}")
        gb = lambda row: _number(_scaled(program(row, "step").get("bytes_accessed"), 1e-9), "{:.2f}")
        step_ratio, fwd_bwd_ratio = (ours_over_deepmind(ours, theirs, name) for name in ("step", "fwd_bwd"))
        theirs_step = ms(theirs, "step")
        ours_step_ms, theirs_step_ms = (program(row, "step").get("estimate_ms") for row in (ours, theirs))
        if "refused" in program(theirs, "step"):
            refused.append(key)
            theirs_step = "does not fit"
            if ours and not ours["remat"] and ours_step_ms:
                only_ours_fit.append((key, ours_step_ms))
        elif ours and ours["remat"] and ours_step_ms and theirs_step_ms:
            remat_only.append((key, ours_step_ms / theirs_step_ms))  # a user of ours pays for the remat there
        lines.append(f"| {theirs['config']} | {theirs['target']} | {theirs['image_size']} | {key[2]} | " + " | ".join([
            theirs_step, f"**{ms(ours, 'step')}**" + (" (remat)" if ours and ours["remat"] else ""),
            _number(step_ratio, "{:.3f}×"), ms(theirs, "fwd_bwd"),
            ms(ours, "fwd_bwd") + _dagger(ours, "fwd_bwd"),
            _number(fwd_bwd_ratio, "{:.3f}×"),
            f"{gb(theirs)} / {gb(ours)}", theirs["date"]]) + " |")
    name = lambda key: f"{key[0]} on {key[1]}"
    fit_notes = ("" if not refused else " DeepMind's step does not fit the device at that batch (the compiler "
                   f"refused it): {', '.join(name(key) for key in refused)}.")
    if only_ours_fit:
        fit_notes += (" Ours fits there without remat: " + "; ".join(
            f"{name(key)}, {step_ms:.2f} ms" for key, step_ms in only_ours_fit) + ".")
    if remat_only:
        fit_notes += (" DeepMind's step fits without remat where ours needs it: " + "; ".join(
            f"{name(key)}, ours with remat {ratio:.3f}× DeepMind's step" for key, ratio in remat_only) + ".")
    if not ratios:
        return ("\n".join(lines) + "\n\nNo config has both DeepMind's step and ours compiled without remat yet."
                + fit_notes)
    goal, stretch = OURS_OVER_DEEPMIND_TARGETS

    def over_deepmind(what: str, measured: list[tuple[tuple, float]]) -> str:
        over = [f"{name(key)} {ratio:.3f}×" for key, ratio in measured if ratio > goal]
        count = len(measured)
        return (f"Our {what} over DeepMind's: {generated_section.value_range([r for _, r in measured], '{:.3f}×')} "
                f"over the {count} config{'s' if count > 1 else ''} and target{'s' if count > 1 else ''} with both; "
                f"above the {goal:.2f}× goal: {'; '.join(over) if over else 'none'}")

    within_stretch = [name(key) for key, ratio in ratios if ratio <= stretch]
    text = (over_deepmind("step", ratios) + f"; at or below the {stretch:.2f}× stretch goal: "
            f"{', '.join(within_stretch) if within_stretch else 'none'}.")
    if fwd_bwd_ratios:
        text += " " + over_deepmind("forward + backward", fwd_bwd_ratios) + "."
    return "\n".join(lines) + "\n\n" + text + fit_notes


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per config and target: the estimate of each program (ms), the runner over the bare
    step and what its extras cost, bytes accessed and peak memory of the runner's step, compile times."""
    head = ("| config | target | px | batch | remat | runner's step (ms) | bare step (ms) | runner / bare | "
            "metrics (ms) | guard, means, RNG (ms) | fwd+bwd (ms) | forward (ms) | step TFLOP | step GB accessed | "
            "step peak GiB | compile s (CPU s), step / bare; ×n: median of n | compiled with |")
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for row in rows:
        programs = row["programs"]
        step, bare = programs.get("step", {}), programs.get("bare", {})
        prefix = (f"| {row['config']} | {row['target']} | {row['image_size']} | {row['per_device_batch']} | "
                  f"{'on' if row['remat'] else 'off'} | ")
        if not row["estimate_valid"]:
            lines.append(prefix + f"no estimate ({row['no_estimate_because']}) |" + " — |" * (columns - 6))
            continue
        extras = row["runner_over_bare"]
        ms = lambda name: _number(programs.get(name, {}).get("estimate_ms"), "{:.2f}") + _dagger(row, name)
        lines.append(prefix + " | ".join([
            f"**{ms('step')}**", ms("bare"), _number(extras["ratio"], "{:.3f}×"),
            _number(extras["metrics_ms"], "{:+.2f}"), _number(extras["guard_means_rng_ms"], "{:+.2f}"),
            ms("fwd_bwd"), ms("forward"), _number(_scaled(step.get("flops"), 1e-12), "{:.2f}"),
            _number(_scaled(step.get("bytes_accessed"), 1e-9), "{:.2f}"), _number(step.get("peak_gib"), "{:.2f}"),
            f"{_compile_time(step)} / {_compile_time(bare)}",
            _choices_cell(row.get("choices") or {}),
        ]) + " |")
    return "\n".join(lines)


SECTION = "table"  # the page's generated sections (experiments.generated_section)
DEEPMIND_SECTION = "deepmind"
GOALS_SECTION = "goals"


def _compile_time(program: dict[str, Any]) -> str:
    cpu, runs = compile_time(program, "compile_cpu_s"), len(program.get("compile_s_runs") or [])
    return (_number(compile_time(program, "compile_s"), "{:.0f}") + ("" if cpu is None else f" ({cpu:.0f})")
            + (f" ×{runs}" if runs > 1 else ""))


def _choices_cell(choices: dict[str, Any]) -> str:
    recompute = str(choices.get("activation_backward", "")).startswith("recomputed")
    # rows compiled before the weight standardisation's layout was chosen per platform (2026-12-06) lack it
    statistics = choices.get("weight_standardisation_statistics")
    return (f"{choices.get('grouped_convs_as', '?')} convs, activations {'recomputed' if recompute else 'kept'}"
            + ("" if statistics is None else f", WS statistics {statistics}"))


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _number(value: float | None, template: str) -> str:
    return "—" if value is None else template.format(value)


# ---- Command line ----

FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_list("only", list(DEFAULT_SPECS), "Config specs file.py:arg, as experiments.memory_plan takes them.",
                  flag_values=FLAGS)
_CONFIG = command_line.define_config_flag(FLAGS, "to estimate instead of --only's list", None)
flags.DEFINE_list("targets", list(memory_plan.TPU_TARGETS), "TPU targets, of " + ", ".join(memory_plan.TPU_TARGETS),
                  flag_values=FLAGS)
flags.DEFINE_list("programs", list(PROGRAMS), "Programs to compile, of " + ", ".join(PROGRAMS), flag_values=FLAGS)
flags.DEFINE_integer("per_device_batch", None, "Images per device (default: the recipe's).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_enum("remat", "auto", ["auto", "off", "on"], "auto: remat where the runner's step does not fit the "
                  "target with headroom.", flag_values=FLAGS)
flags.DEFINE_string("table", None, "A file of this benchmark's JSON lines: print its Markdown table and exit.",
                    flag_values=FLAGS)
flags.DEFINE_bool("alone", False, "Internal: compile the one program of --programs with --remat on|off and print "
                  "its measurement (each program gets a fresh process).", flag_values=FLAGS)
flags.DEFINE_integer("compile_repeats", 1, "Compile the runner's and the bare step this many times each, "
                     "alternating, each in a fresh process, and compare their median compile times.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("into", None, "With --table: write it between this page's generated-table markers instead of "
                    "printing it.", flag_values=FLAGS)


def _child_command(spec: str, target: str, programs: Sequence[str], remat: str | None = None) -> list[str]:
    configs = command_line.config_arguments(FLAGS) or [f"--only={spec}"]
    command = [sys.executable, "-m", "benchmarks.tpu_step_estimate", *configs, f"--targets={target}",
               f"--remat={remat or FLAGS.remat}", f"--programs={','.join(programs)}"]
    if FLAGS.per_device_batch:
        command.append(f"--per_device_batch={FLAGS.per_device_batch}")
    if FLAGS.compile_repeats > 1 and remat is None:  # a row's process repeats; each --alone child compiles once
        command.append(f"--compile_repeats={FLAGS.compile_repeats}")
    return command


def _measure_in_child(spec: str, target: str) -> Callable[[str, bool], dict[str, Any]]:
    """`(program, remat) -> measurement`, each compiled in a fresh process (`--alone`).

    The first large compile in a process takes longer than the same compile after another: F0's
    bare step on a TPUv3 core took 160 CPU s compiled first and 148 after the runner's step, which
    took 140 after it and 153 compiled again (2026-12-06, docs/tpu_step_cost_log.md). Compiled in one
    process, whichever program comes first (the runner's step: it decides whether the target's
    estimate is usable) pays that; each in a process of its own, every program compiles cold."""

    def measure(name: str, use_remat: bool) -> dict[str, Any]:
        child = subprocess.run([*_child_command(spec, target, [name], "on" if use_remat else "off"), "--alone"],
                               stdout=subprocess.PIPE, text=True, check=False)
        if child.returncode:
            command_line.fail(f"{spec} on {target}: compiling {name} failed (exit {child.returncode}); "
                              "its error is above.")
        return json.loads(child.stdout.strip().splitlines()[-1])

    return measure


def _measure_alone(spec: str, target: str, program: str, remat: str, per_device_batch: int | None,
                   config: Any) -> dict[str, Any]:
    """The `--alone` child: one program of `spec`, compiled first and only in this process."""
    config, batch = memory_plan.planned_config(spec, config, per_device_batch)
    device = memory_plan.target_device(memory_plan.TPU_TARGETS[target])
    return measure_program(*programs_for(config, batch, device, remat == "on")[program])


def main(argv: list[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], lambda: _CONFIG.value,
                             flag_values=FLAGS, multihost=False, positional=False)
    args = FLAGS
    if args.into and not args.table:
        command_line.fail("--into writes the table of --table=JSONL into a page: pass --table too.")
    if args.table:
        try:
            sections = render_sections(generated_section.read_json_lines(args.table))
        except (OSError, ValueError, KeyError, TypeError) as error:
            command_line.fail(f"--table={args.table}: cannot read its rows ({error}).")
        if not args.into:
            print("\n\n".join(sections.values()))
            return
        try:
            generated_section.write_sections(args.into, sections)
        except (OSError, ValueError) as error:
            command_line.fail(f"--into={args.into}: {error}")
        return
    specs = memory_plan.requested_specs(FLAGS, _CONFIG.value, [])
    targets = [t.strip() for t in args.targets if t.strip()]
    programs = [p.strip() for p in args.programs if p.strip()]
    unknown = [t for t in targets if t not in memory_plan.TPU_TARGETS]
    if unknown or not targets:
        command_line.fail(f"unknown --targets {unknown}; choose from {list(memory_plan.TPU_TARGETS)}.")
    if set(programs) - set(PROGRAMS) or not programs:
        command_line.fail(f"--programs must be some of {list(PROGRAMS)}.")
    if args.compile_repeats > 1 and not {"step", "bare"} <= set(programs):
        command_line.fail("--compile_repeats compares the runner's and the bare step: include step,bare in --programs.")
    try:
        memory_plan.check_target(targets[0])
    except ValueError as error:
        command_line.fail(error)
    if len(specs) * len(targets) > 1:  # one config and target per process (host memory, see module doc)
        for spec in specs:
            for target in targets:
                child = subprocess.run(_child_command(spec, target, programs), stdout=subprocess.PIPE, text=True,
                                       check=False)
                print(child.stdout, end="", flush=True)
                if child.returncode:
                    command_line.fail(f"{spec} on {target} failed (exit {child.returncode}); its error is above.")
        return
    memory_plan.prepare_deviceless_compiles()
    if args.alone:
        if len(programs) != 1 or args.remat == "auto":
            command_line.fail("--alone compiles one program (--programs=NAME) with --remat=on|off.")
        print(json.dumps(_measure_alone(specs[0], targets[0], programs[0], args.remat, args.per_device_batch,
                                        _CONFIG.value)), flush=True)
        return
    row = estimate(specs[0], targets[0], per_device_batch=args.per_device_batch, remat=args.remat,
                   programs=programs, config=_CONFIG.value, measure_alone=_measure_in_child(specs[0], targets[0]),
                   compile_repeats=args.compile_repeats)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
