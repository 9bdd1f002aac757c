"""Learning-rate schedule: linear warmup from 0, then cosine (or constant).

The official NFNet run (paper App. A.1; official `experiment_nfnets.py:get_config`) uses a peak of
`0.1 × batch/256` (1.6 at batch 4096), a linear warmup from 0 over 5 epochs, then a cosine
decay to 0 at the last step:

    lr(t) = peak · t / W                                     for t ≤ W
    lr(t) = min_lr + (peak − min_lr) · ½ (1 + cos(π (t − W) / (T − W)))   for W < t ≤ T

with W = warmup_epochs · steps_per_epoch, which is *fractional* in the official code
(5 · 1,281,167/4096 = 1563.92), and lr(0) = 0, so the first step only fills the momentum
buffer. After T the rate stays at min_lr.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


def peak_learning_rate(opt_config: Any, batch_size: int) -> float:
    """The base LR, scaled linearly by batch/256 when `lr_scale_by_batch` (paper §6.1)."""
    scale = batch_size / 256.0 if opt_config.lr_scale_by_batch else 1.0
    return float(opt_config.lr) * scale


def _after_linear_warmup(peak: Any, warmup_steps: Any, then: optax.Schedule) -> optax.Schedule:
    """lr(t) = peak · t / W for t < W (so lr(0) = 0, and W may be fractional), else `then(t)`.

    At t = W both pieces give `peak`, so using `<` here and `≤` in the official
    `WarmupCosineDecay` is the same schedule. `peak` and `warmup_steps` may be traced.
    """

    def schedule(step: Any) -> Any:
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * step / jnp.maximum(warmup_steps, 1e-12)
        return jnp.where(step < warmup_steps, warmup, then(step))

    return schedule


def warmup_cosine_at(step: Any, peak: Any, warmup_steps: Any, total_steps: Any, min_lr: Any = 0.0) -> jax.Array:
    """`warmup_cosine(peak, warmup_steps, total_steps, min_lr)(step)` without its checks, so that
    every argument may be a traced value (one compiled program training runs with different
    learning rates and lengths, `analysis.in_memory_training`); the caller keeps
    0 ≤ warmup_steps < total_steps."""

    def cosine(step: jax.Array) -> jax.Array:
        progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))

    return _after_linear_warmup(peak, warmup_steps, cosine)(step)


def warmup_cosine(peak: float, warmup_steps: float, total_steps: int, min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps` (may be fractional), then cosine to `min_lr`.

    Past `total_steps` the rate stays at `min_lr` (the official cosine would rise again).
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup ({warmup_steps} steps) must be shorter than training ({total_steps} steps); "
            "lower optimizer.warmup_epochs or train longer."
        )
    if not 0 <= min_lr <= peak:
        raise ValueError(
            f"optimizer.min_lr ({min_lr}) must lie in [0, peak LR = {peak}] (the peak is lr, times "
            "batch/256 when lr_scale_by_batch); lower min_lr."
        )

    return lambda step: warmup_cosine_at(step, peak, warmup_steps, total_steps, min_lr)


def warmup_constant(peak: float, warmup_steps: float) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then constant `peak`."""
    if warmup_steps < 0:
        raise ValueError(f"warmup steps must be >= 0, got {warmup_steps}; check optimizer.warmup_epochs.")

    return _after_linear_warmup(peak, warmup_steps, lambda step: jnp.full_like(step, peak))


def make_lr_schedule(
    opt_config: Any, *, steps_per_epoch: float, total_steps: int, batch_size: int
) -> optax.Schedule:
    """The learning-rate schedule of `opt_config` (`config.optimizer`).

    Args:
      opt_config: reads `lr`, `lr_scale_by_batch`, `warmup_epochs`, `schedule`, `min_lr`.
      steps_per_epoch: optimizer steps per epoch. May be a float: pass
        `num_train_examples / batch_size` to reproduce the official fractional warmup.
      total_steps: the step at which the cosine reaches `min_lr`.
      batch_size: the global batch size, for the batch/256 LR scaling.
    """
    if not steps_per_epoch > 0 or not total_steps > 0 or not batch_size > 0:
        raise ValueError(
            f"steps_per_epoch ({steps_per_epoch}), total_steps ({total_steps}) and batch_size "
            f"({batch_size}) must all be positive."
        )
    peak = peak_learning_rate(opt_config, batch_size)
    warmup_steps = float(opt_config.warmup_epochs) * float(steps_per_epoch)
    if opt_config.schedule == "cosine":
        return warmup_cosine(peak, warmup_steps, int(total_steps), float(opt_config.min_lr))
    if opt_config.schedule == "constant":
        return warmup_constant(peak, warmup_steps)
    raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {opt_config.schedule!r}.")
