"""Inference that standardises every weight once per set of weights, instead of on every batch.

Why: `WSConv2D` recomputes ŵ = gain·(w − mean)·rsqrt(max(fan_in·var, eps)) on every call (paper
eq. 1, official `base.py:WSConv2D`), which training needs — the weights change every step — but
inference does not: an evaluation pass, or a served model, applies the same weights to every batch.
On a 2-core CPU that recomputation is ~6% of NFNet-F0's forward at batch 8 (21 ms of ~355 ms,
`python -m benchmarks.compare_timm`); it reads every conv weight twice per batch on any device.

How: nothing in the model changes and the parameter tree is the one DeepMind's checkpoints load
into. `standardized_kernels` runs the forward once under a Haiku method interceptor that records
what each `WSConv2D.standardized_weight` returns (under `jit`, XLA drops the rest of the forward,
whose outputs are unused); `apply_with_kernels` runs the forward under an interceptor that returns
those kernels instead of recomputing them. Each module's own code computes its kernel (its eps, its
shape), so every model built from `layers.WSConv2D` — NFNets, NF-ResNets, NF-RegNets — is covered.
Recompute the kernels whenever the weights change (after loading a checkpoint, once per eval pass).
"""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers

Kernels = dict[str, jax.Array]

_METHOD = "standardized_weight"


def _is_standardization(context: hk.MethodContext) -> bool:
    return isinstance(context.module, layers.WSConv2D) and context.method_name == _METHOD


def standardized_kernels(forward: hk.TransformedWithState, params: hk.Params, state: hk.State,
                         sample_images: jax.Array) -> Kernels:
    """{module name: the kernel its WSConv2D convolves with} for `params`, computed once.

    `sample_images`: any batch the model accepts (one small image is enough; its values do not
    matter). Call it under `jax.jit` — `standardized_kernels_fn` does — so that only the
    standardisation is computed. Raises ValueError if the model has no weight-standardised conv.
    """
    kernels: Kernels = {}

    def record(next_fun, args, kwargs, context: hk.MethodContext):
        out = next_fun(*args, **kwargs)
        if _is_standardization(context):
            kernels[context.module.module_name] = out
        return out

    with hk.intercept_methods(record):
        forward.apply(params, state, None, sample_images, is_training=False)
    if not kernels:
        raise ValueError("This model has no weight-standardised convolution (layers.WSConv2D); "
                         "apply it with forward.apply directly.")
    return kernels


def standardized_kernels_fn(forward: hk.TransformedWithState, sample_shape: tuple[int, ...] = (1, 32, 32, 3)):
    """A jitted `(params, state) -> kernels`: only the standardisations are computed, in the dtype
    of the params (pass the params the eval applies: bfloat16 ones give bfloat16 kernels)."""

    def compute(params: hk.Params, state: hk.State) -> Kernels:
        dtype = jax.tree.leaves(params)[0].dtype
        return standardized_kernels(forward, params, state, jnp.zeros(sample_shape, dtype))

    return jax.jit(compute)


def apply_with_kernels(forward: hk.TransformedWithState, params: hk.Params, state: hk.State, kernels: Kernels,
                       images: jax.Array, rng: Any = None) -> tuple[jax.Array, hk.State]:
    """`forward.apply(params, state, rng, images, is_training=False)`, reusing `kernels`.

    Each kernel is cast to the dtype its conv computes in (the images' dtype for the models here),
    as the standardisation's own output would be. Raises KeyError (a module without a kernel) or
    ValueError (a kernel of the wrong shape) naming the module if `kernels` came from another model.
    """

    def reuse(next_fun, args, kwargs, context: hk.MethodContext):
        if not _is_standardization(context):
            return next_fun(*args, **kwargs)
        module, name = context.module, context.module.module_name
        if name not in kernels:
            raise KeyError(f"No standardised kernel for {name!r}: `kernels` were computed for another "
                           "model; recompute them with standardized_kernels for this one.")
        in_channels = kwargs.get("in_channels", args[0] if args else None)
        dtype = kwargs.get("dtype", args[1] if len(args) > 1 else kernels[name].dtype)
        expected = (module.kernel_shape, module.kernel_shape, in_channels // module.feature_group_count,
                    module.output_channels)
        if tuple(kernels[name].shape) != expected:
            raise ValueError(f"The kernel for {name!r} has shape {tuple(kernels[name].shape)}, this model's "
                             f"conv needs {expected}: `kernels` were computed for another model (another "
                             "width?); recompute them with standardized_kernels for this one.")
        return kernels[name].astype(dtype)

    with hk.intercept_methods(reuse):
        return forward.apply(params, state, rng, images, is_training=False)
