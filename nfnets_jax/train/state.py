"""The training state: everything a resumed run needs, in one pytree.

Why a NamedTuple of plain arrays: it is a pytree that `jax.jit`, `jax.pmap` and orbax all take as
is, and every field is what the official experiment checkpoints (`CHECKPOINT_ATTRS`:
params, state, ema_params, opt_state; official `experiment.py`) plus the step and the RNG, so that
a restart continues bit-exactly where the run stopped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class TrainState(NamedTuple):
    """One copy of the run's state (replicated over devices, never stacked).

    Attributes:
      step: int32 scalar, the number of optimizer steps taken; also the position in the data
        stream (the train iterator resumes at `start_step=step`).
      params: float32 master parameters.
      model_state: Haiku state (BatchNorm statistics for the BN baseline; empty for NF models).
      opt_state: the optax state of the chain AGC -> weight decay -> SGD (float32).
      ema_params: exponential moving average of `params` (paper App. A.1, official `utils.py:tf1_ema`),
        or None when EMA is disabled.
      rng: uint32[2] base key; the step and the device index are folded in inside the step.
    """

    step: jax.Array
    params: hk.Params
    model_state: hk.State
    opt_state: optax.OptState
    ema_params: hk.Params | None
    rng: jax.Array


def init_train_state(
    forward: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    *,
    seed: int,
    sample_images: jax.Array | np.ndarray,
    use_ema: bool,
    initial_params: hk.Params | None = None,
) -> TrainState:
    """Initialises params, optimizer and EMA from one seed, so every replica is identical.

    The official code initialises with bf16 inputs and so starts from bf16-rounded weights
    (official `_initialize_train`); we always initialise in float32 (the f32 master copy), which is what
    the paper describes. The EMA starts equal to the initial params, as in the official code.
    `initial_params` (fine-tuning: pretrained weights with a new head) replace the random ones;
    the optimizer state and the EMA then start from them.
    This function is pure; call it under `jax.jit` with replicated `out_shardings`.
    """
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    params, model_state = forward.init(init_rng, jnp.asarray(sample_images, jnp.float32), is_training=True)
    if initial_params is not None:
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), initial_params)
    opt_state = optimizer.init(params)
    ema_params = jax.tree.map(jnp.copy, params) if use_ema else None
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        ema_params=ema_params,
        rng=train_rng,
    )
