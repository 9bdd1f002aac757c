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
(all of its work, elementwise included, as the compiler's cost model counts it).
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
    """Sum of conv and matmul MACs in `jaxpr`, recursing into nested jaxprs (jit, custom_jvp)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "dot_general":
            total += _dot_macs(eqn)
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


def xla_flops(compiled: Any) -> float | None:
    """FLOPs of a compiled program by XLA's cost analysis (`jax.stages.Compiled`), None where the
    backend gives none. Some jax versions return the analysis as a one-element list."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
    flops = (analysis or {}).get("flops")
    return None if flops is None else float(flops)
