"""The per-group ("split") grouped conv equals XLA's native grouped conv: values, dW and dX, under
jit, vmap and pmap, and through a whole tiny NFNet's training gradient. The reference for each
check is `jax.grad` of the plain `conv_general_dilated(..., feature_group_count=G)`."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import losses, models
from nfnets_jax.models import grouped_conv, layers, registry

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def plain_grouped_conv(x, kernel, stride, groups):
    """XLA's grouped conv, written out here so the reference does not go through the code under test."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )


def random_problem(groups, size, stride, kernel_size=3, in_per_group=3, out_per_group=2, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, groups * in_per_group)).astype(np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, in_per_group, groups * out_per_group)).astype(np.float32)
    out_size = -(-size // stride)
    cotangent = rng.standard_normal((batch, out_size, out_size, groups * out_per_group)).astype(np.float32)
    return x, kernel, cotangent


def value_and_vjp(fn, x, kernel, cotangent):
    out, pullback = jax.vjp(fn, x, kernel)
    dx, dkernel = pullback(cotangent)
    return out, dx, dkernel


# Group counts 1 (dense path), 2, 3, 4, 8; strides 1/2; SAME padding on odd and even sizes
# (stride 2 on an even size pads only at the end, on an odd size on both sides); 1×1 kernels.
CASES = [
    (1, 1, 6, 3),
    (2, 1, 6, 3),
    (2, 2, 6, 3),
    (3, 2, 7, 3),
    (4, 1, 5, 3),
    (4, 2, 8, 3),
    (8, 2, 9, 3),
    (4, 1, 6, 1),
    (2, 2, 7, 1),
    (1, 1, 6, 1),  # dense 1×1 convs: a matrix product on the "split" path
    (1, 2, 7, 1),
]


@pytest.mark.parametrize("groups,stride,size,kernel_size", CASES)
def test_split_matches_xla_values_and_gradients(groups, stride, size, kernel_size):
    x, kernel, cotangent = random_problem(groups, size, stride, kernel_size)
    want = value_and_vjp(lambda a, w: plain_grouped_conv(a, w, stride, groups), x, kernel, cotangent)
    split = jax.jit(lambda a, w: grouped_conv.conv2d_same(a, w, stride, groups, impl="split"))
    got = value_and_vjp(split, x, kernel, cotangent)
    for name, g, w in zip(("output", "dX", "dW"), got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, err_msg=name, **TOLERANCE)
    # "xla" is the plain op itself.
    xla = value_and_vjp(lambda a, w: grouped_conv.conv2d_same(a, w, stride, groups, impl="xla"), x, kernel, cotangent)
    for g, w in zip(xla, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.slow
def test_split_gradient_of_a_scalar_loss_under_jit_grad():
    """jax.grad of a nonlinear loss through two stacked grouped convs (the conv1 → conv1b pattern)."""
    x, kernel, _ = random_problem(4, 7, 2, in_per_group=2, out_per_group=2)
    kernel_b = np.random.default_rng(1).standard_normal((3, 3, 2, 8)).astype(np.float32)

    def loss(impl, a, w, wb):
        if impl == "plain":
            h = plain_grouped_conv(jnp.tanh(plain_grouped_conv(a, w, 2, 4)), wb, 1, 4)
        else:
            h = grouped_conv.conv2d_same(jnp.tanh(grouped_conv.conv2d_same(a, w, 2, 4, impl)), wb, 1, 4, impl)
        return jnp.sum(jnp.sin(h))

    want = jax.grad(lambda *a: loss("plain", *a), argnums=(0, 1, 2))(x, kernel, kernel_b)
    got = jax.jit(jax.grad(lambda *a: loss("split", *a), argnums=(0, 1, 2)))(x, kernel, kernel_b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOLERANCE)


def test_split_under_vmap_and_pmap():
    """Per-example (vmap) and per-device (pmap, as the trainer's step) weight gradients match."""
    x, kernel, _ = random_problem(2, 6, 2, batch=4)

    def grad_fn(conv):
        return jax.grad(lambda w, a: jnp.sum(conv(a, w) ** 2))

    plain = grad_fn(lambda a, w: plain_grouped_conv(a, w, 2, 2))
    split = grad_fn(lambda a, w: grouped_conv.conv2d_same(a, w, 2, 2, impl="split"))
    per_example = x[:, None]  # [4, 1, H, W, C]: vmap over examples, each a batch of one.
    np.testing.assert_allclose(
        jax.vmap(split, in_axes=(None, 0))(kernel, per_example),
        jax.vmap(plain, in_axes=(None, 0))(kernel, per_example),
        **TOLERANCE,
    )
    devices = jax.devices()[:2]
    shards = x.reshape(len(devices), -1, *x.shape[1:])
    replicated = np.broadcast_to(kernel, (len(devices),) + kernel.shape)
    pmean = lambda fn: jax.pmap(lambda w, a: jax.lax.pmean(fn(w, a), "i"), axis_name="i", devices=devices)  # noqa: E731
    np.testing.assert_allclose(pmean(split)(replicated, shards), pmean(plain)(replicated, shards), **TOLERANCE)


# The tiny CPU NFNet (test_nfnet.TINY): bottleneck widths 8/16/32/32 with group size 8 give 1, 2,
# 4 and 4 groups, so stages 2–4 exercise the grouped path.
TINY = dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), group_size=8, stem_channels=(8, 8, 8, 8))


@pytest.mark.slow
def test_tiny_nfnet_training_gradient_is_the_same_with_both_impls():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    targets = jax.nn.one_hot(jnp.array([3, 7]), 10)

    def transformed(impl):
        return hk.transform_with_state(
            lambda images: models.create("nfnet_f0", 10, grouped_conv_impl=impl, **TINY)(images, True)
        )

    # Parameters drawn directly from their shapes (a jitted `init` would cost more CPU than the
    # check); skip gains are nonzero so the residual branches, and their grouped convs, reach the loss.
    shapes, state = jax.eval_shape(transformed("xla").init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(0)
    offset = {"gain": 1.0, "skip_gain": 0.5}
    params = {
        module: {
            leaf: (offset.get(leaf, 0.0) + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
            for leaf, s in leaves.items()
        }
        for module, leaves in shapes.items()
    }

    def grads(impl):
        forward = transformed(impl)

        def loss(p):
            logits, _ = forward.apply(p, state, jax.random.PRNGKey(2), x)
            return jnp.mean(losses.softmax_cross_entropy(logits, targets))

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_xla, grads_xla), (loss_split, grads_split) = grads("xla"), grads("split")
    np.testing.assert_allclose(loss_split, loss_xla, rtol=1e-6)
    assert jax.tree_util.tree_structure(grads_split) == jax.tree_util.tree_structure(grads_xla)
    # Float rounding: relative 1e-4, or absolute 1e-6 of the largest gradient anywhere in the tree.
    scale = max(float(np.max(np.abs(w))) for w in jax.tree_util.tree_leaves(grads_xla))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads_split), jax.tree_util.tree_leaves(grads_xla)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))
    grouped = grads_split["NFNet/~/nf_block_3/~/conv1"]["w"]
    assert grouped.shape == (3, 3, 8, 32) and float(jnp.max(jnp.abs(grouped))) > 0  # 4 groups of 8, reached.


def test_impl_changes_neither_parameters_nor_macs():
    shapes = {impl: registry.macs_and_params("nfnet_f0", 64, grouped_conv_impl=impl, **TINY) for impl in ("xla", "split")}
    assert shapes["xla"] == shapes["split"]


def test_auto_splits_few_groups_on_cpu_and_unknown_names_are_rejected():
    assert grouped_conv.resolve_impl("auto", 6, "cpu") == "split"
    assert grouped_conv.resolve_impl("auto", grouped_conv.AUTO_SPLIT_MAX_GROUPS + 1, "cpu") == "xla"
    assert grouped_conv.resolve_impl("auto", 6, "tpu") == grouped_conv.resolve_impl("auto", 6, "cuda") == "xla"
    assert grouped_conv.resolve_impl("split", 100, "tpu") == "split"
    assert grouped_conv.resolve_impl("xla", 6, "cpu") == "xla"
    conv = hk.transform(lambda a: layers.WSConv2D(4, 3, grouped_conv_impl="fast")(a))
    with pytest.raises(ValueError, match="grouped_conv_impl"):
        conv.init(None, jnp.zeros((1, 4, 4, 4)))


def _lowered_for(platform, fn, *args):
    """The StableHLO text of `fn` lowered for `platform`; lowering needs no device of that kind."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_auto_is_chosen_for_the_platform_the_program_is_lowered_for():
    """Not for the backend this process runs on (the CPU here): lowered for a TPU or a GPU, a 1×1
    conv and a 2-group 3×3 conv stay XLA convolutions; lowered for the CPU, the 1×1 conv is a
    matrix product and the grouped conv two dense convolutions."""
    x = jnp.ones((2, 6, 6, 8))
    pointwise, grouped = jnp.ones((1, 1, 8, 4)), jnp.ones((3, 3, 2, 8))

    def two_convs(a):
        return grouped_conv.conv2d_same(grouped_conv.conv2d_same(a, pointwise, 1), grouped, 1, 2)

    cpu = _lowered_for("cpu", two_convs, x)
    assert cpu.count("dot_general") == 1 and cpu.count("stablehlo.convolution") == 2
    assert "feature_group_count = 2" not in cpu
    for platform in ("tpu", "cuda"):
        lowered = _lowered_for(platform, two_convs, x)
        assert "dot_general" not in lowered and lowered.count("stablehlo.convolution") == 2
        assert lowered.count("feature_group_count = 2") == 1
    # Same numbers whichever platform's choice runs (here: the CPU's, against the plain op).
    want = plain_grouped_conv(plain_grouped_conv(x, pointwise, 1, 1), grouped, 1, 2)
    np.testing.assert_allclose(jax.jit(two_convs)(x), want, **TOLERANCE)
