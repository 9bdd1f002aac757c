"""`benchmarks.profile_train_step.classify` on a real compiled program: every convolution and dot
is found, inside XLA:CPU's library fusions too, and a weight gradient is told from a forward."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import profile_train_step


def _compiled_conv_and_dense_gradient() -> str:
    def loss(kernel, dense, x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y.reshape(y.shape[0], -1) @ dense))

    rng = np.random.default_rng(0)
    args = (rng.standard_normal((3, 3, 8, 16)), rng.standard_normal((16 * 12 * 12, 10)),
            rng.standard_normal((4, 12, 12, 8)))
    args = [jnp.asarray(a, jnp.float32) for a in args]
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()


def test_every_convolution_and_dot_lands_in_its_bucket():
    hlo = _compiled_conv_and_dense_gradient()
    buckets = profile_train_step.classify(hlo)
    found = {bucket for bucket, _, _ in buckets.values()}
    assert {"conv forward", "conv dW", "dot forward", "dot backward"} <= found, found
    # No instruction that is or holds a convolution/dot may be counted as elementwise or other.
    bodies = profile_train_step._computations(hlo)  # pylint: disable=protected-access
    for lines in bodies.values():
        for line in lines:
            match = profile_train_step._INSTRUCTION.match(line)  # pylint: disable=protected-access
            if not match or match.group(3) != "fusion":
                continue
            called = re.search(r"calls=%?([\w.\-]+)", line).group(1)
            inner = " ".join(bodies[called])
            if " convolution(" in inner or " dot(" in inner:
                assert buckets[match.group(1)][0].startswith(("conv", "dot")), (line, buckets[match.group(1)])
