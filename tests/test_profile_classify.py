"""`benchmarks.profile_train_step.classify` on a real compiled program: every convolution and dot
is found, inside XLA:CPU's library fusions too, and a weight gradient is told from a forward."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import profile_train_step
from nfnets_jax.train import config_files


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


def _forward_macs(config_spec: str, batch: int, res: int) -> int:
    """Multiply-adds of the eval forward's convs and dots, counted on its jaxpr (models/flops.py)."""
    from nfnets_jax.models import flops  # pylint: disable=import-outside-toplevel
    from nfnets_jax.train import one_device_step  # pylint: disable=import-outside-toplevel

    config = config_files.load_config(config_spec)
    config.data.image_size = res
    step = one_device_step.build(config, batch)
    state = step.abstract_state()
    images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
    return flops.jaxpr_macs(jax.make_jaxpr(step.evaluate)(state.params, state.model_state, images).jaxpr)


def test_each_pass_profiles_its_own_program():
    """The inference passes hold no backward work and cost what their convs and dots do: 2 FLOPs per
    multiply-add, less the taps that fall on SAME padding (XLA does not count them; at 16 px the
    last stages are 2×2 maps, so up to ~20% here), plus the elementwise work XLA also counts. The
    train step holds input and weight gradients, each about one forward's work, so it costs at least
    two forwards more than one forward (its optimizer, AGC and weight-standardisation work are extra)."""
    spec = str(profile_train_step.REPO_ROOT / "configs" / "digits.py")
    batch, res = 4, 16
    config = config_files.load_config(spec)
    config.data.image_size = res
    runs = {which: profile_train_step.profile(config, "digits.py", batch, 1, "auto", "float32", which=which)
            for which in profile_train_step.PASSES}
    forward_flops = 2 * _forward_macs(spec, batch, res)
    for which in ("inference", "inference_kernels_once"):
        run = runs[which]
        assert run["pass"] == which
        assert not any(k in bucket for bucket in run["buckets"] for k in ("backward", "dW", "dX")), run["buckets"]
        assert 0.8 * forward_flops <= run["xla_gflop_per_step"] * 1e9 <= 1.5 * forward_flops, (run, forward_flops)
        assert run["wall_ms_per_step"] > 0 and run["gflop_per_s"] > 0
    train = runs["train"]
    assert {"conv dW", "conv dX"} & set(train["buckets"]), train["buckets"]
    assert 3.0 <= train["xla_gflop_per_step"] / runs["inference_kernels_once"]["xla_gflop_per_step"] <= 8.0, train
