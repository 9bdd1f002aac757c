"""Adaptive Gradient Clipping (Brock et al. 2021, §4) with clip telemetry.

For every *unit* i of a parameter W (everything feeding one output unit: a column of an IO
linear weight, an output filter of an HWIO conv kernel) with gradient G:

    max_norm_i = clipping · max(‖W_i‖_F, eps)
    G_i ← G_i · max_norm_i / max(‖G_i‖_F, 1e-6)     if ‖G_i‖_F > max_norm_i

(paper §4, eq. 3; official `optim.py:SGD_AGC`). `eps` keeps zero-initialised parameters such as
`skip_gain` trainable; the 1e-6 only guards the division. Scalars and vectors (anything whose
squeezed rank is ≤ 1) are one unit.

It must see the cross-device *averaged* raw gradient, before weight decay and momentum
(official `optim.py:SGD_AGC`), so it goes first in the chain built by `factory.make_optimizer`.
Unlike `optax.adaptive_grad_clip` it keeps, in its state, how many units it clipped at the last
update, so the training step can log the clip fraction without recomputing any norm
(`clip_fraction_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax.optim import groups as groups_lib

# Guards the division by the gradient norm (official `SGD_AGC` and optax use the same value).
_GRAD_NORM_FLOOR = 1e-6


class AGCState(NamedTuple):
    """Clip statistics of the last update, one scalar per clipped parameter leaf.

    Attributes:
      num_clipped: int32 number of units whose gradient was rescaled at the last update.
      num_units: int32 number of units of the leaf (constant; stored so the global fraction can
        be weighted by units without access to the params).
    """

    num_clipped: Any
    num_units: Any


def unit_axes(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes a unit's norm reduces over, or None for a whole-tensor norm.

    Haiku layouts put output units on the last axis: IO linears (and rank-3 "multi-head"
    linears) reduce over axis 0, HWIO conv kernels over (0, 1, 2), DHWIO over (0, 1, 2, 3).
    Tensors whose squeezed rank is ≤ 1 (scalars, vectors, a (1, 1, 1, C) kernel) are one unit,
    as in the official `unitwise_norm`.
    """
    squeezed_rank = sum(1 for size in shape if size != 1)
    if squeezed_rank <= 1:
        return None
    rank = len(shape)
    if rank in (2, 3):
        return (0,)
    if rank in (4, 5):
        return tuple(range(rank - 1))
    raise ValueError(
        f"adaptive_grad_clip does not know the unit layout of a rank-{rank} tensor of shape "
        f"{shape}; exclude it with the optimizer's agc.exclude patterns."
    )


def count_units(shape: tuple[int, ...]) -> int:
    """How many units a tensor of this shape has for AGC (1 for whole-tensor norms)."""
    axes = unit_axes(shape)
    if axes is None:
        return 1
    reduced = int(np.prod([shape[axis] for axis in axes]))
    return int(np.prod(shape)) // reduced


def unitwise_squared_norm(x: jax.Array) -> jax.Array:
    """Sum of squares per unit, kept broadcastable against `x` (computed in float32)."""
    squared = jnp.square(x.astype(jnp.float32))
    axes = unit_axes(x.shape)
    if axes is None:
        return jnp.sum(squared)
    return jnp.sum(squared, axis=axes, keepdims=True)


def unitwise_norm(x: jax.Array) -> jax.Array:
    """Frobenius norm per unit, kept broadcastable against `x` (computed in float32)."""
    return jnp.sqrt(unitwise_squared_norm(x))


def global_norm(tree: Any) -> jax.Array:
    """The Frobenius norm of a whole tree (as `optax.tree.norm`), summed from the unit-wise squared
    norms AGC computes.

    In a step where AGC clips the same gradients with the same parameters, XLA computes each
    leaf's reduction once (the expressions are identical, so common-subexpression elimination
    merges them) and the norm costs a sum over the per-unit values. A whole-tensor reduction
    beside AGC's per-unit one is a second pass over every leaf: reporting the gradient and
    parameter norms that way cost F5's step on a TPU v5p chip 2.97 ms (+7 GB of HBM traffic,
    docs/tpu_step_cost_log.md). The barrier keeps XLA from folding the sum of the per-unit sums back
    into one whole-tensor reduction (which it does otherwise, and which is that second pass)."""
    per_leaf = [jnp.sum(jax.lax.optimization_barrier(unitwise_squared_norm(leaf))) for leaf in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(per_leaf, jnp.zeros((), jnp.float32)))


def _clip_leaf(grad: jax.Array, param: jax.Array, clipping: float, eps: float) -> tuple[jax.Array, jax.Array]:
    """Clips one leaf; returns the clipped gradient and the number of clipped units."""
    grad32 = grad.astype(jnp.float32)
    grad_norm = unitwise_norm(grad32)
    max_norm = clipping * jnp.maximum(unitwise_norm(param), eps)
    is_clipped = grad_norm > max_norm
    scale = jnp.where(is_clipped, max_norm / jnp.maximum(grad_norm, _GRAD_NORM_FLOOR), 1.0)
    return (grad32 * scale).astype(grad.dtype), jnp.sum(is_clipped, dtype=jnp.int32)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """AGC as an optax transformation (Brock et al. 2021, §4, eq. 3).

    Apply it to all parameters except the classifier weight with `optax.masked` (see
    `groups.exclusion_mask` and `factory.make_optimizer`); masked-out leaves are neither
    clipped nor counted in the telemetry.

    Args:
      clipping: λ, the largest allowed ratio ‖G_i‖/max(‖W_i‖, eps). The paper uses 0.01 at
        batch 4096 and notes that larger batches need smaller λ.
        A JAX scalar (e.g. traced, to train several λ in one `jax.vmap`) is accepted as is
        and not validated; `inf` then means no clipping.
      eps: floor on the weight norm, so zero-initialised parameters can still move (1e-3).

    Returns:
      A transformation whose `update` requires `params` and whose state is an `AGCState`.
    """
    if not isinstance(clipping, jax.Array) and not clipping > 0:
        raise ValueError(
            f"adaptive_grad_clip: clipping must be > 0, got {clipping}; to turn AGC off, leave it "
            "out of the chain (optimizer.agc.clipping = None)."
        )
    if not eps >= 0:
        raise ValueError(f"adaptive_grad_clip: eps must be >= 0, got {eps}.")

    def init_fn(params: optax.Params) -> AGCState:
        num_units = jax.tree.map(lambda p: jnp.asarray(count_units(p.shape), jnp.int32), params)
        num_clipped = jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params)
        return AGCState(num_clipped=num_clipped, num_units=num_units)

    def update_fn(
        updates: optax.Updates, state: AGCState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AGCState]:
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs the current parameters (the clip threshold is relative "
                "to ‖W‖): call update(grads, opt_state, params)."
            )
        pairs = jax.tree.map(lambda g, p: _clip_leaf(g, p, clipping, eps), updates, params)
        # `pairs` has a (grad, count) tuple at every leaf position of `updates`.
        treedef = jax.tree.structure(updates)
        flat_pairs = treedef.flatten_up_to(pairs)
        new_updates = treedef.unflatten([grad for grad, _ in flat_pairs])
        num_clipped = treedef.unflatten([count for _, count in flat_pairs])
        return new_updates, AGCState(num_clipped=num_clipped, num_units=state.num_units)

    return optax.GradientTransformation(init_fn, update_fn)


def find_agc_states(opt_state: Any) -> list[AGCState]:
    """Every `AGCState` inside a nested optax state (chain, masked, inject_hyperparams, ...)."""
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda node: isinstance(node, AGCState))
    return [node for node in nodes if isinstance(node, AGCState)]


def clip_fraction_metrics(opt_state: Any, groups: Mapping[str, str] | None = None) -> dict[str, jax.Array]:
    """Fraction of AGC units clipped at the last update, from the optimizer state alone.

    Returns `agc/clip_fraction`: clipped units / units over every leaf AGC acts on (so the
    global value is weighted by number of units, and leaves masked out of AGC, such as the
    classifier weight, do not count); and, for each `label -> regex` of `groups` (e.g. the
    per-stage regexes of `models.stage_regexes`), `agc/clip_fraction/<label>` over the clipped
    leaves whose path matches. A label that matches no AGC leaf is left out (there is nothing
    to report), and the result is empty if the state holds no AGC at all (AGC disabled).

    Works on a per-device state inside a pmapped step, or on a replicated state outside it
    (the counts then keep their leading device axis).
    """
    counts: list[tuple[str, jax.Array, jax.Array]] = []
    for state in find_agc_states(opt_state):
        clipped = groups_lib.named_leaves(state.num_clipped)
        units = groups_lib.named_leaves(state.num_units)
        for (path, num_clipped), (_, num_units) in zip(clipped, units):
            counts.append((path, num_clipped, num_units))
    if not counts:
        return {}

    def fraction(selected: list[tuple[str, jax.Array, jax.Array]]) -> jax.Array:
        total_clipped = sum(jnp.asarray(c, jnp.float32) for _, c, _ in selected)
        total_units = sum(jnp.asarray(u, jnp.float32) for _, _, u in selected)
        return total_clipped / total_units

    metrics = {"agc/clip_fraction": fraction(counts)}
    if groups:
        members = groups_lib.group_membership(groups, [path for path, _, _ in counts])
        for label, paths in members.items():
            selected_paths = set(paths)
            selected = [entry for entry in counts if entry[0] in selected_paths]
            if selected:
                metrics[f"agc/clip_fraction/{label}"] = fraction(selected)
    return metrics
