"""Exponential moving average of the params with the TF1 warmup (official `utils.py:tf1_ema`).

    decay_t = min(decay, (1 + t) / (10 + t))
    ema ← decay_t · ema + (1 − decay_t) · params

With decay 0.99999 the (1+t)/(10+t) cap governs the whole 112,602-step ImageNet run (it only
reaches 0.99999 near t ≈ 900k; the decay at the end is 0.99992), so in practice this is a
polynomial average whose mean age is about t/10. A constant 0.99999 without the cap would stay
biased towards the initial weights for the whole run.

`t` is the index of the optimizer step that produced `params` (0 for the first update), as the
official code passes the step's `global_step`. The EMA starts equal to the initial params.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def tf1_decay(step: Any, decay: float) -> jax.Array:
    """min(decay, (1 + step) / (10 + step)) as float32 (TF1 `ExponentialMovingAverage` num_updates)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, step: Any, decay: float) -> Any:
    """One EMA step: decay_t · ema + (1 − decay_t) · params, leaf by leaf, in each leaf's dtype.

    Args:
      ema_params: the running average (same tree as params).
      params: the params after this step's optimizer update.
      step: index of this optimizer step (0-based).
      decay: the target decay (config.optimizer.ema_decay, 0.99999 for NFNets).
    """
    if not 0 <= decay < 1:
        raise ValueError(f"ema decay must be in [0, 1), got {decay}; set optimizer.ema_decay=None to disable EMA.")
    decay_t = tf1_decay(step, decay)
    return jax.tree.map(
        lambda average, value: (decay_t * average + (1.0 - decay_t) * value).astype(average.dtype),
        ema_params,
        params,
    )
