"""The NFNet paper's modified SAM (Brock et al. 2021, §6.1 and App. A.4; docs/recipe.md).

SAM (Foret et al. 2021) takes its descent gradient at perturbed parameters
w + ρ·g/‖g‖, where g is an "ascent" gradient at w. The NFNet paper changes two things:

- the ascent gradient is computed on only a fraction (20%) of the *same* batch, which costs
  +20–40% step time instead of +100% (a different batch "destroyed all the benefits");
- under data parallelism the ascent gradient is **not** averaged across devices: each replica
  perturbs its own copy of the params with its own g (m-sharpness, as in Foret et al.).

The descent gradient is then taken at the perturbed params on the full per-device batch,
averaged across devices and fed to the normal optimizer (AGC → weight decay → SGD). The
params themselves are never left perturbed: the optimizer's update is applied to w.

The logic exists once, in `sam_gradients`. `with_sam` wraps it as an optax transformation,
and that transformation is the only SAM the runner's train step knows: the step hands every
optimizer `grad_fn`, `batch` and its device `axis_name` as extra arguments, so a SAM built from
the config and one built in a notebook take the same path. See `with_sam` for the calling
convention.

Which examples form the ascent slice: the **first** floor(ascent_fraction · n) examples along
the leading axis of every batch leaf (at least 1), where n is the per-device batch size.
The per-device batches are shuffled, so a fixed leading slice is an unbiased subset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Keeps the normalisation finite when the ascent gradient is exactly zero (optax's
# `contrib.normalize` has no epsilon and returns NaN there).
DEFAULT_NORM_EPS = 1e-12

GradFn = Callable[[Any, Any], tuple[Any, Any]]


def ascent_size(batch_size: int, ascent_fraction: float) -> int:
    """Number of leading examples used for the ascent step: floor(fraction · batch), at least 1.

    A tiny tolerance absorbs float error (0.2 · 10 is 2.0000000000000004, 0.29 · 100 is
    28.999999999999996), so exact products are never rounded the wrong way.
    """
    if not 0 < ascent_fraction <= 1:
        raise ValueError(f"ascent_fraction must be in (0, 1], got {ascent_fraction}.")
    return max(1, math.floor(ascent_fraction * batch_size + 1e-6))


def _leading_batch_size(batch: Any) -> int:
    """The shared size of the leading (example) axis of every leaf of `batch`."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
    if not sizes:
        raise ValueError("sam_gradients: the batch has no arrays.")
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "sam_gradients: every leaf of the batch must share a leading example axis (per "
            f"device), got leading sizes {sorted(s for s in sizes if s is not None)}"
            f"{' and scalar leaves' if None in sizes else ''}; move per-batch constants out of the batch."
        )
    return sizes.pop()


def perturb_params(params: Any, ascent_grads: Any, rho: float, eps: float = DEFAULT_NORM_EPS) -> Any:
    """w + ρ · g / (‖g‖₂ + eps), with ‖g‖₂ the global norm over the whole tree (float32)."""
    leaves = jax.tree.leaves(ascent_grads)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))
    scale = rho / (norm + eps)
    return jax.tree.map(lambda p, g: (p + scale * g).astype(p.dtype), params, ascent_grads)


def sam_gradients(
    grad_fn: GradFn,
    params: Any,
    batch: Any,
    *,
    rho: float,
    ascent_fraction: float,
    sync_ascent: bool,
    axis_name: str | None = None,
    eps: float = DEFAULT_NORM_EPS,
) -> tuple[Any, Any]:
    """Descent gradients of the modified SAM, for one device's batch.

    Args:
      grad_fn: `grad_fn(params, batch) -> (grads, aux)`, e.g. `jax.grad(loss, has_aux=True)`.
      params: the current (unperturbed) params.
      batch: pytree whose leaves all have the per-device example axis first.
      rho: perturbation radius ρ (0.05 in the paper's fine-tuning runs and in Foret et al.).
      ascent_fraction: share of the batch for the ascent gradient (0.2 in the paper); the
        first `ascent_size(n, ascent_fraction)` examples are used.
      sync_ascent: average the ascent gradient over `axis_name` (plain SAM). False (the
        paper's choice) gives each replica its own perturbation, normalised by its own ‖g‖.
      axis_name: the pmap / shard_map axis; only used when `sync_ascent` (None means one
        device, where there is nothing to average).
      eps: added to ‖g‖ so an all-zero ascent gradient gives no perturbation instead of NaN.

    Returns:
      `grad_fn(w + ρ·g/‖g‖, batch)` on the FULL batch: the descent grads and aux. They are not
      averaged across devices; the caller pmeans them before the optimizer.
    """
    if not rho > 0:
        raise ValueError(f"sam_gradients: rho must be > 0, got {rho}; to disable SAM, call grad_fn directly.")
    num_ascent = ascent_size(_leading_batch_size(batch), ascent_fraction)
    ascent_batch = jax.tree.map(lambda leaf: leaf[:num_ascent], batch)
    ascent_grads, _ = grad_fn(params, ascent_batch)
    if sync_ascent and axis_name is not None:
        ascent_grads = jax.lax.pmean(ascent_grads, axis_name)
    perturbed = perturb_params(params, ascent_grads, rho, eps)
    return grad_fn(perturbed, batch)


class SAMState(NamedTuple):
    """State of `with_sam`: the wrapped optimizer's state, untouched by SAM itself."""

    inner_state: Any


def with_sam(
    inner: optax.GradientTransformation,
    *,
    rho: float = 0.05,
    ascent_fraction: float = 0.2,
    sync_ascent: bool = False,
    axis_name: str | None = None,
    eps: float = DEFAULT_NORM_EPS,
) -> optax.GradientTransformationExtraArgs:
    """Wraps any optax optimizer with the modified SAM; one line to switch it on.

    Calling convention (optax.contrib.sam's opaque mode, with the batch made explicit so the
    ascent slice can be taken here)::

        opt = with_sam(make_optimizer(...), rho=0.05)      # or with_sam(optax.adamw(1e-3))
        updates, opt_state = opt.update(grads, opt_state, params,
                                        grad_fn=jax.grad(loss_fn), batch=batch)

    `grad_fn(params, batch) -> grads`. The incoming `grads` are ignored: SAM computes its own
    ascent and descent gradients from `grad_fn` and `batch` (under `jit`, XLA drops the unused
    computation). The same `update` line therefore works with SAM off, because optax chains
    accept and ignore the extra `grad_fn`/`batch` arguments; there the incoming `grads` are
    used as they are, so under pmap pass grads already averaged over devices.

    With an axis name (inside pmap / shard_map), the descent gradient is averaged over it
    before `inner`, so every replica applies the same update; the ascent gradient is averaged
    only if `sync_ascent`. The axis is either fixed here (`axis_name=`) or, when left None,
    taken from an `axis_name=` extra argument of `update`: the runner's train step passes its
    device axis that way, so an optimizer built in a notebook without knowing the runner's
    axis still averages correctly there.

    Args:
      inner: the optimizer that consumes the descent gradient (e.g. AGC → WD → SGD).
      rho, ascent_fraction, sync_ascent, axis_name, eps: see `sam_gradients`.
    """
    if not rho > 0:
        raise ValueError(f"with_sam: rho must be > 0, got {rho}; to disable SAM, use the inner optimizer alone.")
    ascent_size(1, ascent_fraction)  # validates the fraction now, not at the first step
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SAMState:
        return SAMState(inner_state=inner.init(params))

    def update_fn(
        updates: optax.Updates,
        state: SAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Callable[[Any, Any], Any] | None = None,
        batch: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        # The runner passes its device axis as an extra argument; one fixed at build time wins.
        device_axis = axis_name if axis_name is not None else extra_args.get("axis_name")
        del updates  # SAM computes its own gradients; see the docstring.
        if params is None or grad_fn is None or batch is None:
            raise ValueError(
                "with_sam needs update(grads, opt_state, params, grad_fn=..., batch=...): "
                "grad_fn(params, batch) -> grads is evaluated at the perturbed params."
            )
        descent_grads, _ = sam_gradients(
            lambda p, b: (grad_fn(p, b), None),
            params,
            batch,
            rho=rho,
            ascent_fraction=ascent_fraction,
            sync_ascent=sync_ascent,
            axis_name=device_axis,
            eps=eps,
        )
        if device_axis is not None:
            descent_grads = jax.lax.pmean(descent_grads, device_axis)
        new_updates, inner_state = inner.update(descent_grads, state.inner_state, params, **extra_args)
        return new_updates, SAMState(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def with_sam_from_config(
    inner: optax.GradientTransformation, sam_config: Any, *, axis_name: str | None = None
) -> optax.GradientTransformation:
    """`with_sam` from `config.optimizer.sam`; returns `inner` unchanged when rho is None/0."""
    if sam_config is None or not sam_config.rho:
        return inner
    return with_sam(
        inner,
        rho=sam_config.rho,
        ascent_fraction=sam_config.ascent_fraction,
        sync_ascent=sam_config.sync_ascent,
        axis_name=axis_name,
    )
