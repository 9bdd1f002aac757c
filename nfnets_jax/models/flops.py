"""Multiply-accumulate (MAC) counting for convs and linears, from the traced computation.

The paper's Table 3 "#FLOPs" are the official `count_flops`: one MAC per weight per output position,
for convolutions and linear layers only, per image, at the *test* resolution
(official `base.py:count_conv_flops`). Rather than re-deriving layer sizes by hand, we trace
the model's forward pass with `jax.make_jaxpr` on abstract inputs (nothing is computed) and sum
the MACs of every `conv_general_dilated` and `dot_general` in the graph (tests check the
result against the official counts of all 16 NFNet variants). At resolutions that are
multiples of 32 this equals the official count exactly; elsewhere it uses the true SAME output
sizes (ceil), where the official code used fractional sizes.

`xla_flops` reads the other count the benchmarks report beside it: XLA's own, of a compiled program
(all of its work, elementwise included, as the compiler's cost model counts it); `xla_cost` reads
the whole of that cost analysis (FLOPs, bytes accessed, XLA:TPU's run-time estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def _conv_macs(eqn: jex_core.JaxprEqn) -> int:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    # rhs_spec = (out_feature_dim, in_feature_dim, *spatial dims); every output element needs
    # (in_channels / groups) × kernel-volume MACs, and rhs already holds in_channels / groups.
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    per_output = rhs.shape[rhs_spec[1]] * int(np.prod([rhs.shape[d] for d in rhs_spec[2:]]))
    return int(np.prod(out.shape)) * per_output


def _dot_macs(eqn: jex_core.JaxprEqn) -> int:
    lhs = eqn.invars[0].aval
    out = eqn.outvars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    contracted = int(np.prod([lhs.shape[d] for d in lhs_contract]))
    return int(np.prod(out.shape)) * contracted


def _sub_jaxprs(eqn: jex_core.JaxprEqn):
    for value in eqn.params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for item in values:
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def jaxpr_macs(jaxpr: jex_core.Jaxpr) -> int:
    """Sum of conv and matmul MACs in `jaxpr`, recursing into nested jaxprs (jit, custom_jvp).

    A `cond` runs one of its branches, so it counts as its largest branch: the model's
    `lax.platform_dependent` choices (`grouped_conv.conv2d_same`) trace one branch per platform,
    each computing the same convolution, and only one of them is ever lowered.
    """
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "dot_general":
            total += _dot_macs(eqn)
        elif name == "cond":
            total += max(jaxpr_macs(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            for sub in _sub_jaxprs(eqn):
                total += jaxpr_macs(sub)
    return total


def traced_counts(init_fn: Callable, imsize: int) -> tuple[int, Any]:
    """(MACs of one forward pass on one `imsize`² RGB image, shape tree of what `init_fn` returns).

    `init_fn(rng, x)` is a Haiku `init`: it runs the model's forward pass once, so a single
    abstract trace gives both the MACs and the parameter shapes. Initialisers and training-only
    ops (dropout, stochastic depth, BN statistics) contain no convolutions or matmuls, so the
    count equals that of an eval-mode forward pass.
    """
    image = jax.ShapeDtypeStruct((1, imsize, imsize, 3), jnp.float32)
    closed, shapes = jax.make_jaxpr(init_fn, return_shape=True)(jax.random.PRNGKey(0), image)
    return jaxpr_macs(closed.jaxpr), shapes


def xla_cost(compiled: Any) -> dict[str, float | None]:
    """XLA's cost analysis of a compiled program (`jax.stages.Compiled`): `flops`, `bytes_accessed`
    (what its ops read and write in device memory) and `optimal_seconds`, the compiler's own
    performance-model estimate of its run time, which XLA:TPU gives and XLA:CPU does not. None
    for what the backend does not report. Some jax versions return the analysis as a one-element
    list."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
    analysis = analysis or {}
    keys = {"flops": "flops", "bytes_accessed": "bytes accessed", "optimal_seconds": "optimal_seconds"}
    return {name: None if analysis.get(key) is None else float(analysis[key]) for name, key in keys.items()}


def xla_flops(compiled: Any) -> float | None:
    """FLOPs of a compiled program by XLA's cost analysis (`xla_cost`), None where the backend
    gives none."""
    return xla_cost(compiled)["flops"]
