"""Reading an optimizer's hyperparameters (learning rate, momentum, ...) from its state.

`optax.inject_hyperparams` keeps the values an optimizer used at its last update in its state.
Reading them there, wherever the injected optimizer sits (inside `optax.chain`, `optax.masked`
or `with_sam`), means the runner logs what was applied, for any optimizer, without a second
copy of the schedule that could drift from the one inside the optimizer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

_INJECTED_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _is_injected(node: Any) -> bool:
    return isinstance(node, _INJECTED_STATES)


def current_hyperparams(opt_state: Any) -> dict[str, jax.Array]:
    """Numeric scalar hyperparameters of every `inject_hyperparams` state inside `opt_state`.

    Returns `name -> float32 scalar`, e.g. `{'learning_rate': ..., 'momentum': ...}` for the
    NFNet chain. After `update`, the values are those that update used (`learning_rate` is the
    schedule at the step just taken). When several injected optimizers are nested, a name met
    again gets the suffix `_1`, `_2`, ... in tree order. An optimizer built without
    `inject_hyperparams` (e.g. `optax.adamw(1e-3)`) contributes nothing: wrap it as
    `optax.inject_hyperparams(optax.adamw)(learning_rate=...)` to have its learning rate logged.
    """
    found: dict[str, jax.Array] = {}
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected):
        if not _is_injected(node):
            continue
        for name, value in node.hyperparams.items():
            if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.number):
                continue
            key, suffix = name, 1
            while key in found:
                key, suffix = f"{name}_{suffix}", suffix + 1
            found[key] = jnp.asarray(value, jnp.float32)
    return found
