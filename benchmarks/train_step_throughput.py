"""Throughput and MFU of the runner's real train step on one device (made for GPUs and TPUs).

Compiles `nfnets_jax.train.one_device_step` for a config (`--config`, default `configs/nfnet.py:F0`
in the recipe's bfloat16, with `--config.a.b=value` overrides as `experiments.train` takes them)
at a per-device batch and reports images/s, ms/step and the model FLOP
utilisation (MFU) against the device's peak (`--peak_tflops`, the card's dense bf16 figure, e.g.
989 for an H100/H200 SXM, 312 for an A100, 61.5 for one TPUv3 core, which is one JAX device).

Timing: `--steps` steps are dispatched back to back and waited for once, as the training loop
runs them (it never waits for a step before dispatching the next), so the host's dispatch of
one step overlaps the device's work on the previous one; `ms_per_step` is that total over
`--steps`. `synced_ms_per_step` times steps one at a time (dispatch, wait), which adds the host's
dispatch latency to every step.

FLOPs: `model_tflop_per_step` is 3 x the forward pass's FLOPs (2 per multiply-add of every
convolution and matmul, counted from the model's jaxpr by `nfnets_jax.models.flops`) x the batch:
the forward, and the backward's two products (input and weight gradients) of the same size. MFU
is computed from it, the usual convention, so rematerialisation's extra forward does not count
as useful work. `xla_tflop_per_step` is XLA's own count of the compiled step
(`compiled.cost_analysis()`), shown for comparison: XLA:GPU leaves out the convolutions it hands
to cuDNN (custom calls), so on a GPU it is far below the model's count.
`--batch 0` searches for the largest batch that compiles and runs (doubling, then bisecting).

    python -m benchmarks.train_step_throughput --batch 32 --peak_tflops 989
    python -m benchmarks.train_step_throughput --batch 0 --peak_tflops 989      # largest that fits
    python -m benchmarks.train_step_throughput --batch 0 --config.train.remat=True   # ... with remat
    python -m benchmarks.train_step_throughput --config.precision.compute_dtype=float32 --batch 8 --steps 3  # CPU
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from experiments import command_line
from nfnets_jax.runtime import host_memory, provenance
from nfnets_jax.analysis.compiled_memory import compiled_memory
from nfnets_jax.models import flops as flops_lib
from nfnets_jax.train import one_device_step



def forward_macs_per_image(step: one_device_step.OneDeviceStep, image_size: int) -> int:
    """Multiply-adds of the convolutions and matmuls of one training-mode forward pass, one image."""
    abstract = step.abstract_state()
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda params, model_state, x: step.forward.apply(
        params, model_state, jax.random.PRNGKey(0), x, is_training=True))(
            abstract.params, abstract.model_state, image)
    return flops_lib.jaxpr_macs(jaxpr.jaxpr)


def measure(config: ml_collections.ConfigDict, config_name: str, batch: int, steps: int,
            peak_tflops: float | None) -> dict[str, Any]:
    """Compiles, warms up and times `config`'s train step (its compute dtype, its `train.remat`);
    returns the JSON record, which names the config `config_name`."""
    step = one_device_step.build(config, batch)
    start = time.perf_counter()
    compiled = step.train.lower(step.abstract_state(), step.batch_shapes).compile()
    compile_s = time.perf_counter() - start
    flops = flops_lib.xla_flops(compiled)
    memory = compiled_memory(compiled)
    model_flops = 3 * 2 * forward_macs_per_image(step, config.data.image_size) * batch
    state, data = jax.jit(step.init_state)(), step.random_batch()
    state, _ = jax.block_until_ready(compiled(state, data))  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, data))
        times.append(time.perf_counter() - start)
    synced = statistics.median(times)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    pipelined = (time.perf_counter() - start) / steps
    achieved = model_flops / pipelined / 1e12
    return {
        "config": config_name, "model": config.model.name, "res": config.data.image_size,
        "per_device_batch": batch, "dtype": config.precision.compute_dtype, "remat": bool(config.train.remat),
        "steps": steps,
        "ms_per_step": round(1e3 * pipelined, 2), "images_per_s": round(batch / pipelined, 2),
        "synced_ms_per_step": round(1e3 * synced, 2), "synced_step_times_ms": [round(1e3 * t, 2) for t in times],
        "model_tflop_per_step": round(model_flops / 1e12, 4),
        "xla_tflop_per_step": None if flops is None else round(flops / 1e12, 4),
        "achieved_tflops": round(achieved, 2),
        "peak_tflops": peak_tflops,
        "mfu": None if not peak_tflops else round(achieved / peak_tflops, 4),
        "peak_memory_gib": round(memory.peak_gib, 2),
        "compile_s": round(compile_s, 1), "loss_finite": bool(metrics["nonfinite"] == 0),
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
    }


def _fits(config: ml_collections.ConfigDict, batch: int) -> bool:
    try:
        measure(config, "", batch, 1, None)
        return True
    except Exception as error:  # pylint: disable=broad-except  # XLA reports OOM as several types
        if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
            return False
        raise


def largest_batch(config: ml_collections.ConfigDict, start: int = 32, limit: int = 4096) -> int:
    """The largest per-device batch whose step compiles and runs: doubling from `start`, then
    bisecting; 0 when not even one image fits."""
    if not _fits(config, start):
        low, high = 0, start
    else:
        low, high = start, start * 2
        while high <= limit and _fits(config, high):
            low, high = high, high * 2
    while high - low > max(1, low // 16):  # stop within ~6%
        middle = (low + high) // 2
        low, high = (middle, high) if _fits(config, middle) else (low, middle)
    return low


DEFAULT_CONFIG = "nfnet.py:F0"
FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
_CONFIG = command_line.define_config_flag(FLAGS, "whose train step is timed", DEFAULT_CONFIG)
flags.DEFINE_integer("batch", 32, "Per-device batch; 0 = the largest that fits.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("peak_tflops", None, "The device's dense peak for the config's compute dtype (for the MFU).",
                   lower_bound=0.0, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], lambda: _CONFIG.value,
                             default_config=command_line.project_config(DEFAULT_CONFIG), flag_values=FLAGS, multihost=False,
                             positional=False)
    args, config = FLAGS, _CONFIG.value
    name = pathlib.Path(command_line.config_spec(FLAGS)).name
    host_memory.keep_freed_memory()  # as the runner does on a CPU host (nfnets_jax/runtime/host_memory.py)
    batch = args.batch or largest_batch(config)
    if batch == 0:
        command_line.fail(f"{name} does not fit even at batch 1 per device; try --config.train.remat=True.")
    print(json.dumps({**measure(config, name, batch, args.steps, args.peak_tflops), "provenance": provenance.collect()}),
          flush=True)

if __name__ == "__main__":
    main()
