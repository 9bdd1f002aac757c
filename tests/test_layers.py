"""The NF building blocks against independent re-derivations (NumPy, quadrature, closed forms)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import layers


# --------------------------------------------------------------------------- WSConv2D


def numpy_conv_same(x, w, stride, groups):
    """Direct NHWC/HWIO convolution with TensorFlow SAME padding, written from its definition:
    out = ceil(in / stride); total pad = max((out-1)·stride + k - in, 0), the extra on the end."""
    n, h, width, c = x.shape
    k, _, cin_g, cout = w.shape
    outs = []
    for size in (h, width):
        out = -(-size // stride)
        pad = max((out - 1) * stride + k - size, 0)
        outs.append((out, pad // 2, pad - pad // 2))
    (oh, top, bottom), (ow, left, right) = outs
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    y = np.zeros((n, oh, ow, cout))
    cout_g = cout // groups
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            for g in range(groups):
                p = patch[..., g * cin_g : (g + 1) * cin_g]
                wg = w[..., g * cout_g : (g + 1) * cout_g]
                y[:, i, j, g * cout_g : (g + 1) * cout_g] = np.einsum("nhwi,hwio->no", p, wg)
    return y


def numpy_standardize(w, gain, eps=1e-4):
    """Scaled WS, paper eq. 1 with the official floor: (w - mean) / sqrt(max(N·var, eps)) · gain."""
    fan_in = np.prod(w.shape[:-1])
    mean = w.mean(axis=(0, 1, 2))
    var = ((w - mean) ** 2).mean(axis=(0, 1, 2))
    return (w - mean) / np.sqrt(np.maximum(fan_in * var, eps)) * gain


@pytest.mark.parametrize("stride,groups,size", [(1, 1, 6), (2, 1, 6), (2, 2, 7), (1, 4, 5)])
def test_wsconv_matches_numpy(stride, groups, size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, size, size, 8)).astype(np.float32)
    conv = hk.transform(lambda inp: layers.WSConv2D(12, 3, stride=stride, feature_group_count=groups, name="c")(inp))
    params = conv.init(jax.random.PRNGKey(0), x)
    params = {
        "c": {
            "w": (rng.standard_normal((3, 3, 8 // groups, 12)) * 0.7 + 0.3).astype(np.float32),
            "gain": rng.uniform(0.5, 1.5, 12).astype(np.float32),
            "bias": rng.standard_normal(12).astype(np.float32),
        }
    }
    got = conv.apply(params, None, x)
    p = params["c"]
    want = numpy_conv_same(x, numpy_standardize(p["w"], p["gain"]), stride, groups) + p["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_wsconv_eps_is_a_floor_on_fan_in_times_var():
    # A near-constant kernel: fan_in·var < 1e-4, so the floor, not the variance, sets the scale.
    w = np.full((1, 1, 4, 2), 0.5, np.float32)
    w[0, 0, 0, :] += 1e-3
    conv = hk.transform(lambda inp: layers.WSConv2D(2, 1, name="c")(inp))
    x = np.array([1, 0, 0, 0], np.float32).reshape(1, 1, 1, 4)  # Picks out the first input row.
    params = {"c": {"w": w, "gain": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)}}
    got = np.asarray(conv.apply(params, None, x))[0, 0, 0]
    fan_in, mean = 4, w.mean(axis=(0, 1, 2))
    var = w.var(axis=(0, 1, 2))
    assert np.all(fan_in * var < 1e-4)
    np.testing.assert_allclose(got, (w[0, 0, 0] - mean) / np.sqrt(1e-4), rtol=1e-4)


def plain_standardize(w, gain, eps=1e-4):
    """The formula as written (JAX differentiates the reductions itself): the reference for the
    hand-written derivative of `layers.standardize_weight`."""
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    return (w - mean) * jax.lax.rsqrt(jnp.maximum(np.prod(w.shape[:-1]) * var, eps)) * gain


def _ws_inputs(shape, seed=0, offset=0.3):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.7 + offset).astype(np.float32)
    gain = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(gain), rng


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (1, 1, 16, 3), (3, 3, 1, 7)])
def test_standardize_weight_value_and_gradients_equal_autodiff_of_the_formula(shape):
    w, gain, rng = _ws_inputs(shape)
    cotangent = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    np.testing.assert_allclose(layers.standardize_weight(w, gain, 1e-4), numpy_standardize(np.asarray(w), np.asarray(gain)),
                               rtol=1e-5, atol=1e-6)
    loss = lambda fn: (lambda w, g: jnp.sum(jnp.sin(fn(w, g, 1e-4)) * cotangent))
    got = jax.grad(loss(layers.standardize_weight), argnums=(0, 1))(w, gain)
    want = jax.grad(loss(plain_standardize), argnums=(0, 1))(w, gain)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_standardize_weight_forward_mode_and_hessian_vector_products_equal_autodiff():
    w, gain, rng = _ws_inputs((3, 3, 4, 5), seed=1)
    dw, dgain = (jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)) for a in (w, gain))
    _, got = jax.jvp(lambda w, g: layers.standardize_weight(w, g, 1e-4), (w, gain), (dw, dgain))
    _, want = jax.jvp(lambda w, g: plain_standardize(w, g), (w, gain), (dw, dgain))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Forward-over-reverse, what Hessian-vector products and curvature tools use.
    hvp = lambda fn: jax.jvp(jax.grad(lambda w: jnp.sum(jnp.sin(fn(w, gain, 1e-4)))), (w,), (dw,))[1]
    want_hvp = hvp(plain_standardize)
    np.testing.assert_allclose(hvp(layers.standardize_weight), want_hvp, rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(want_hvp))))


@pytest.mark.parametrize("as_rows", [True, False])
@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (1, 1, 16, 3), (1, 1, 4, 2)])
def test_both_layouts_of_the_statistics_give_the_formulas_value_and_tangent(as_rows, shape):
    """The CPU computes the statistics on [fan_in, out] rows, every other platform on the kernel
    as it is (`layers._on_lowering_platform`); tests run on the CPU, so each layout is checked
    here directly, the last shape under the eps floor (fan_in·var < eps)."""
    w, gain, rng = _ws_inputs(shape, seed=2)
    if shape == (1, 1, 4, 2):
        w = jnp.full(shape, 0.5, jnp.float32).at[0, 0, 0, :].add(1e-3)
    dw, dgain = (jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)) for a in (w, gain))
    value = layers._standardized(w, gain, eps=1e-4, as_rows=as_rows)
    np.testing.assert_allclose(value, numpy_standardize(np.asarray(w), np.asarray(gain)), rtol=1e-5, atol=1e-6)
    got_value, got_tangent = layers._standardized_jvp(w, gain, dw, dgain, eps=1e-4, as_rows=as_rows)
    want_value, want_tangent = jax.jvp(plain_standardize, (w, gain), (dw, dgain))
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_tangent, want_tangent, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want_tangent))))


def test_kernel_and_its_gradient_are_pinned_to_the_parameters_layout_off_the_cpu():
    """Compiled for a TPU or GPU the standardisation reads the kernel in the row-major layout the
    state stores it in, and its gradient is handed back in that layout (one constraint in the
    forward, its transpose in the backward: `layers._in_parameter_layout`); compiled for the CPU
    the kernel goes through [fan_in, out] rows, which XLA:CPU lays out row-major anyway."""
    w, gain, _ = _ws_inputs((3, 3, 4, 8), seed=3)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(layers.standardize_weight(w, gain, 1e-4)))))
    lowered = {platform: grad.trace(w).lower(lowering_platforms=(platform,)).as_text()
               for platform in ("cpu", "tpu", "cuda")}
    row_major = "result_layouts = [dense<[3, 2, 1, 0]>"
    for platform in ("tpu", "cuda"):
        constraints = [line for line in lowered[platform].splitlines() if "@LayoutConstraint" in line]
        assert len(constraints) == 2 and all(row_major in line for line in constraints), platform
    assert "@LayoutConstraint" not in lowered["cpu"]


def test_standardize_weight_gradient_under_the_eps_floor_keeps_the_scale_constant():
    # fan_in·var < eps: the scale is the constant rsqrt(eps), so only the mean subtraction and
    # the gain carry gradient (the autodiff of the formula agrees).
    w = np.full((1, 1, 4, 2), 0.5, np.float32)
    w[0, 0, 0, :] += 1e-3
    w, gain = jnp.asarray(w), jnp.asarray([0.7, 1.3], jnp.float32)
    cotangent = jnp.asarray(np.arange(8, dtype=np.float32).reshape(1, 1, 4, 2))
    loss = lambda fn: (lambda w, g: jnp.sum(fn(w, g, 1e-4) * cotangent))
    got = jax.grad(loss(layers.standardize_weight), argnums=(0, 1))(w, gain)
    want_w = (cotangent - cotangent.mean(axis=(0, 1, 2))) * gain / np.sqrt(1e-4)
    np.testing.assert_allclose(got[0], want_w, rtol=1e-5)
    want = jax.grad(loss(plain_standardize), argnums=(0, 1))(w, gain)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


def test_wsconv_params_are_hwio_with_unit_gain_and_zero_bias():
    conv = hk.transform(lambda inp: layers.WSConv2D(6, 3, feature_group_count=2, name="c")(inp))
    params = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4)))
    assert params["c"]["w"].shape == (3, 3, 2, 6)
    np.testing.assert_array_equal(params["c"]["gain"], np.ones(6))
    np.testing.assert_array_equal(params["c"]["bias"], np.zeros(6))


def test_wsconv_rejects_indivisible_groups():
    conv = hk.transform(lambda inp: layers.WSConv2D(6, 3, feature_group_count=4)(inp))
    with pytest.raises(ValueError, match="not divisible by 4 groups"):
        conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 6)))


# --------------------------------------------------------------------------- activation gains


def gaussian_variance(fn) -> float:
    """Var(f(z)) for z ~ N(0,1) by trapezoid quadrature on [-12, 12] (error far below 1e-6)."""
    z = np.linspace(-12.0, 12.0, 2_000_001)
    pdf = np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
    y = np.asarray(fn(jnp.asarray(z, jnp.float32)), np.float64)
    mean = np.trapezoid(y * pdf, z)
    return np.trapezoid((y - mean) ** 2 * pdf, z)


ELEMENTWISE = [name for name in layers.ACTIVATION_GAMMAS if name not in ("glu", "log_softmax")]


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_gamma_makes_activation_unit_variance(name):
    """γ = 1/sqrt(Var(f(z))), z ~ N(0,1) (NF-ResNet paper §3). DeepMind's constants are Monte-Carlo
    estimates; they agree with quadrature to 1e-3 relative."""
    gamma = 1.0 / np.sqrt(gaussian_variance(layers.raw_activation(name)))
    assert layers.ACTIVATION_GAMMAS[name] == pytest.approx(gamma, rel=1e-3)
    # And the scaled activation is what the models use.
    assert gaussian_variance(layers.scaled_activation(name)) == pytest.approx(1.0, rel=2e-3)


def test_relu_gamma_closed_form():
    assert layers.ACTIVATION_GAMMAS["relu"] == pytest.approx(np.sqrt(2 / (1 - 1 / np.pi)), rel=1e-3)


def test_glu_and_log_softmax_gammas():
    # glu(a, b) = a·σ(b) with a, b iid N(0,1): Var = E[σ(b)²]. DeepMind's Monte-Carlo constant is
    # 1.2e-3 off this exact value, so the tolerance here is 2e-3.
    z = np.linspace(-12.0, 12.0, 2_000_001)
    pdf = np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
    sigmoid_sq = np.trapezoid((1 / (1 + np.exp(-z))) ** 2 * pdf, z)
    assert layers.ACTIVATION_GAMMAS["glu"] == pytest.approx(1 / np.sqrt(sigmoid_sq), rel=2e-3)
    # log_softmax over a long vector is z minus a near-constant: variance 1.
    z = jax.random.normal(jax.random.PRNGKey(0), (1_000_000,))
    std = float(np.std(np.asarray(jax.nn.log_softmax(z), np.float64)))  # a number, not a jax.Array
    assert layers.ACTIVATION_GAMMAS["log_softmax"] == pytest.approx(1 / std, rel=1e-3)


def test_gelu_is_the_tanh_form():
    x = jnp.linspace(-3, 3, 101)
    tanh_gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(layers.raw_activation("gelu")(x), tanh_gelu, atol=1e-6)


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="choose one of"):
        layers.scaled_activation("swish")


# --------------------------------------------------------------------------- SE, stochastic depth, skip gain


def test_squeeze_excite_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 4, 8)).astype(np.float32)
    se = hk.transform(lambda inp: layers.SqueezeExcite(8, 8, 0.5, name="squeeze_excite")(inp))
    params = se.init(jax.random.PRNGKey(0), x)
    assert params["squeeze_excite/~/linear"]["w"].shape == (8, 4)
    assert params["squeeze_excite/~/linear_1"]["w"].shape == (4, 8)
    params = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    h = x.mean(axis=(1, 2)) @ params["squeeze_excite/~/linear"]["w"] + params["squeeze_excite/~/linear"]["b"]
    h = np.maximum(h, 0) @ params["squeeze_excite/~/linear_1"]["w"] + params["squeeze_excite/~/linear_1"]["b"]
    want = (1 / (1 + np.exp(-h)))[:, None, None, :]
    np.testing.assert_allclose(se.apply(params, None, x), want, rtol=1e-5, atol=1e-6)


def test_stochastic_depth_drops_whole_examples_without_rescale():
    x = jnp.ones((4000, 2, 2, 3))
    sd = hk.transform(lambda inp, train: layers.stochastic_depth(inp, 0.3, train))
    out = np.asarray(sd.apply({}, jax.random.PRNGKey(0), x, True))
    per_example = out.reshape(4000, -1)
    # Every example is either kept unchanged (no 1/keep rescale) or zeroed entirely.
    assert set(np.unique(per_example)) <= {0.0, 1.0}
    assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
    assert per_example[:, 0].mean() == pytest.approx(0.7, abs=0.03)
    np.testing.assert_array_equal(sd.apply({}, None, x, False), x)


def test_skip_gain_is_a_zero_scalar():
    params = hk.transform(lambda: layers.skip_gain(jnp.float32)).init(jax.random.PRNGKey(0))
    assert params["~"]["skip_gain"].shape == ()
    assert params["~"]["skip_gain"] == 0.0


# --------------------------------------------------------------------------- α/β bookkeeping


def test_block_schedule_matches_official_f0_table():
    """β and stochastic-depth rates of F0 with α = 0.2, rate 0.25 (official `nfnet.py:NFNet`)."""
    schedule = layers.block_schedule((1, 2, 6, 3), (1, 2, 2, 2), alpha=0.2, stochdepth_rate=0.25)
    betas = [b.beta for b in schedule]
    # Closed form: transition of stage s>1 gets 1/sqrt(1 + k·α²) with k blocks in the previous
    # stage; the j-th later block of a stage gets 1/sqrt(1 + j·α²).
    want = [1.0, 1 / np.sqrt(1 + 0.04), 1 / np.sqrt(1.04), 1 / np.sqrt(1 + 2 * 0.04)]
    want += [1 / np.sqrt(1 + j * 0.04) for j in range(1, 6)]
    want += [1 / np.sqrt(1 + 6 * 0.04), 1 / np.sqrt(1.04), 1 / np.sqrt(1.08)]
    np.testing.assert_allclose(betas, want, rtol=1e-12)
    np.testing.assert_allclose(betas[9], 0.898027, atol=1e-6)  # DeepMind's measured value.
    np.testing.assert_allclose([b.stochdepth_rate for b in schedule], [0.25 * i / 12 for i in range(12)])
    assert [b.stride for b in schedule] == [1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
    assert [b.stage for b in schedule] == [1, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 4]
    # expected_std is the std of the block output: 1 + α² after a transition, +α² per block.
    np.testing.assert_allclose([b.expected_std**2 for b in schedule][:4], [1.04, 1.04, 1.08, 1.04])


def test_block_schedule_rejects_empty_stage():
    with pytest.raises(ValueError, match="one depth >= 1 per stage"):
        layers.block_schedule((1, 0, 1, 1), (1, 2, 2, 2), 0.2, 0.1)


@pytest.mark.parametrize("name", ["gelu", "relu", "silu", "tanh"])
def test_scaled_activation_derivatives_are_gamma_times_the_raw_ones(name):
    # The recomputing backward (jax.checkpoint) must not change any derivative, in either mode.
    x = jnp.linspace(-4.0, 4.0, 101, dtype=jnp.float32)
    gamma = layers.ACTIVATION_GAMMAS[name]
    scaled, raw = layers.scaled_activation(name), layers.raw_activation(name)
    want = gamma * jax.vmap(jax.grad(raw))(x)
    np.testing.assert_allclose(jax.vmap(jax.grad(scaled))(x), want, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(jax.jvp(scaled, (x,), (jnp.ones_like(x),))[1], want, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(jax.jit(scaled)(x), gamma * raw(x), rtol=1e-6, atol=2e-6)


def test_activation_recompute_is_chosen_for_the_platform_the_program_is_lowered_for():
    """The backward pass recomputes the nonlinearity (jax.checkpoint: an optimization barrier in
    the lowered program) only when compiled for the CPU, whatever backend this process runs on."""
    gelu = layers.scaled_activation("gelu")
    grad = jax.jit(jax.grad(lambda x: jnp.sum(gelu(x))))
    x = jnp.linspace(-3.0, 3.0, 16, dtype=jnp.float32)
    lowered = {platform: grad.trace(x).lower(lowering_platforms=(platform,)).as_text()
               for platform in ("cpu", "tpu", "cuda")}
    assert "optimization_barrier" in lowered["cpu"]
    assert "optimization_barrier" not in lowered["tpu"] and "optimization_barrier" not in lowered["cuda"]
