"""Throughput and MFU of the runner's real train step on one device (made for GPUs and TPUs).

Compiles `nfnets_jax.train.one_device_step` for a config (default `configs/nfnet.py:F0`, in the
recipe's bfloat16) at a per-device batch and reports images/s, ms/step and the model FLOP
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
    python -m benchmarks.train_step_throughput --dtype float32 --batch 8 --steps 3   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from nfnets_jax.runtime import host_memory, provenance  # noqa: E402  pylint: disable=wrong-import-position
from nfnets_jax.analysis.compiled_memory import compiled_memory
from nfnets_jax.models import flops as flops_lib
from nfnets_jax.train import config_files, one_device_step

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def forward_macs_per_image(step: one_device_step.OneDeviceStep, image_size: int) -> int:
    """Multiply-adds of the convolutions and matmuls of one training-mode forward pass, one image."""
    abstract = step.abstract_state()
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda params, model_state, x: step.forward.apply(
        params, model_state, jax.random.PRNGKey(0), x, is_training=True))(
            abstract.params, abstract.model_state, image)
    return flops_lib.jaxpr_macs(jaxpr.jaxpr)


def measure(config_spec: str, batch: int, dtype: str, steps: int, peak_tflops: float | None,
            remat: bool = False) -> dict[str, Any]:
    """Compiles, warms up and times the train step; returns the JSON record."""
    config = config_files.load_config(config_spec)
    config.precision.compute_dtype = dtype
    config.train.remat = remat
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
        "config": pathlib.Path(config_spec).name, "model": config.model.name, "res": config.data.image_size,
        "per_device_batch": batch, "dtype": dtype, "remat": remat, "steps": steps,
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


def _fits(config_spec: str, batch: int, dtype: str, remat: bool) -> bool:
    try:
        measure(config_spec, batch, dtype, 1, None, remat)
        return True
    except Exception as error:  # pylint: disable=broad-except  # XLA reports OOM as several types
        if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
            return False
        raise


def largest_batch(config_spec: str, dtype: str, remat: bool, start: int = 32, limit: int = 4096) -> int:
    """The largest per-device batch whose step compiles and runs: doubling from `start`, then bisecting."""
    if not _fits(config_spec, start, dtype, remat):
        low, high = 0, start
    else:
        low, high = start, start * 2
        while high <= limit and _fits(config_spec, high, dtype, remat):
            low, high = high, high * 2
    while high - low > max(1, low // 16):  # stop within ~6%
        middle = (low + high) // 2
        low, high = (middle, high) if _fits(config_spec, middle, dtype, remat) else (low, middle)
    if low == 0:
        raise SystemExit(f"error: {config_spec} does not fit even at batch 1 per device; try --remat.")
    return low


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "nfnet.py") + ":F0")
    parser.add_argument("--batch", type=int, default=32, help="per-device batch; 0 = the largest that fits")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak for --dtype (dense)")
    parser.add_argument("--remat", action="store_true", help="hk.remat around every block")
    args = parser.parse_args(argv)
    host_memory.keep_freed_memory()  # as the runner does on a CPU host (nfnets_jax/runtime/host_memory.py)
    if args.steps < 1 or args.batch < 0:
        parser.error("--steps must be >= 1 and --batch >= 0")
    batch = args.batch or largest_batch(args.config, args.dtype, args.remat)
    print(json.dumps({**measure(args.config, batch, args.dtype, args.steps, args.peak_tflops, args.remat),
                      "provenance": provenance.collect()}), flush=True)


if __name__ == "__main__":
    main()
