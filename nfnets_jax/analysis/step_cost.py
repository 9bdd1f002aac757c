"""What one training step costs: wall time per step, measured interleaved, and the compiled
step's memory from XLA's own analysis. Used by `experiments.reproduce` for the cost of AGC and
of the modified SAM (Brock et al. 2021 §4, §6.1) and for NF vs BatchNorm (§3).

The step is the library's (`train.step.make_train_step`: forward, loss, [SAM], AGC → weight
decay → SGD, EMA) on one device, wrapped as the runner wraps it (`train.parallel`'s shard_map
backend over a one-device mesh, state donated) and compiled per variant; its memory is
`analysis.compiled_memory`'s reading of the compiled program. Variants are timed round-robin —
variant A, B, C, …, then again — so that a change of machine load between repeats (other jobs
on a shared CPU) hits every variant alike; the per-variant figure is the median over repeats.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import optim
from nfnets_jax.analysis.compiled_memory import CompiledMemory, compiled_memory
from nfnets_jax.train import parallel
from nfnets_jax.train import state as state_lib
from nfnets_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class StepVariant:
    """One way to train: AGC λ (None: off) and SAM (None: off, else its ascent fraction;
    1.0 is full SAM, 0.2 the paper's modified SAM, both unsynced, ρ = 0.05)."""

    name: str
    clipping: float | None = None
    sam_ascent_fraction: float | None = None
    sam_rho: float = 0.05


@dataclasses.dataclass
class CompiledStep:
    """A compiled train step with its initial state and a batch, ready to time."""

    name: str
    run: Callable[[Any], Any]
    state: Any
    batch: dict[str, jax.Array]
    memory: CompiledMemory
    compile_seconds: float


def compile_step(forward: hk.TransformedWithState, variant: StepVariant, *, images: np.ndarray,
                 labels: np.ndarray, num_classes: int, seed: int = 0) -> CompiledStep:
    """Builds the library's train step for `variant`, compiles it on the first device and
    returns it with a fresh state. Optimizer: the paper's defaults (`optim.default_optimizer_config`:
    SGD-Nesterov, weight decay, warmup-cosine), AGC per `variant`."""
    opt_config = optim.default_optimizer_config()
    opt_config.agc.clipping = variant.clipping
    batch_size = int(images.shape[0])
    optimizer = optim.make_optimizer(opt_config, steps_per_epoch=100.0, total_steps=10_000, batch_size=batch_size)
    if variant.sam_ascent_fraction is not None:  # the paper's SAM: unsynced ascent on a slice
        optimizer = optim.with_sam(optimizer, rho=variant.sam_rho, ascent_fraction=variant.sam_ascent_fraction,
                                   sync_ascent=False)
    settings = step_lib.StepSettings(num_classes=num_classes)
    train_step = step_lib.make_train_step(forward, optimizer, settings)
    mapped = parallel.make_shard_map_backend(devices=jax.devices()[:1]).wrap_train(train_step)
    init = jax.jit(lambda: state_lib.init_train_state(forward, optimizer, seed=seed, sample_images=images[:1],
                                                       use_ema=False))
    state = init()
    labels = jnp.asarray(labels, jnp.int32)
    batch = {"images": jnp.asarray(images, jnp.float32), "labels": labels, "mix_labels": labels,
             "ratio": jnp.ones(labels.shape, jnp.float32)}
    start = time.perf_counter()
    compiled = mapped.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    return CompiledStep(variant.name, compiled, state, batch, compiled_memory(compiled), compile_seconds)


def time_interleaved(steps: Sequence[CompiledStep], *, repeats: int, steps_per_repeat: int,
                     warmup_steps: int = 1, on_repeat: Callable[[int], None] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Seconds per step of each compiled step, timed round-robin `repeats` times.

    Each timing runs `steps_per_repeat` steps back to back and waits for the last; the state
    is carried (the steps donate it). Returns per name: `median_s`, `min_s`, `per_repeat_s`.
    `on_repeat(i)` is called after each round (for a progress bar).
    """
    for step in steps:
        for _ in range(warmup_steps):
            step.state, _ = step.run(step.state, step.batch)
        jax.block_until_ready(step.state)
    per_repeat: dict[str, list[float]] = {step.name: [] for step in steps}
    for repeat in range(repeats):
        for step in steps:
            start = time.perf_counter()
            for _ in range(steps_per_repeat):
                step.state, metrics = step.run(step.state, step.batch)
            jax.block_until_ready((step.state, metrics))
            per_repeat[step.name].append((time.perf_counter() - start) / steps_per_repeat)
        if on_repeat is not None:
            on_repeat(repeat)
    return {name: {"median_s": statistics.median(times), "min_s": min(times), "per_repeat_s": times}
            for name, times in per_repeat.items()}


def ratios(timings: Mapping[str, Mapping[str, Any]], baseline: str) -> dict[str, float]:
    """Median step time of each variant over the baseline's."""
    base = timings[baseline]["median_s"]
    return {name: timing["median_s"] / base for name, timing in timings.items()}
