"""Normalizer-Free building blocks shared by NFNets, NF-ResNets and NF-RegNets.

Everything here follows DeepMind's `nfnets/base.py` (docs/official_code_notes.md) so that the
released weights load and reproduce: Scaled Weight Standardisation with an ε *floor* on
fan_in·var, activation gains γ with the official constants, a squeeze-excite whose gate the
caller doubles, batch-wise stochastic depth without the 1/keep rescale, and the α/β
variance bookkeeping with the reset after each transition block (paper §3 and App. C).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Layout, with_layout_constraint

from nfnets_jax.models import grouped_conv

Activation = Callable[[jax.Array], jax.Array]

# γ such that Var(γ·f(z)) = 1 for z ~ N(0, 1) (NF-ResNet paper §3; official `base.nonlinearities`).
# These are DeepMind's own (Monte-Carlo) numbers, kept verbatim because the released weights were
# trained with them; tests re-derive each by quadrature to ~1e-3.
ACTIVATION_GAMMAS: dict[str, float] = {
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "glu": 1.8484294414520264,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

_RAW_ACTIVATIONS: dict[str, Activation] = {
    "celu": jax.nn.celu,
    "elu": jax.nn.elu,
    # The official code calls jax.nn.gelu with its default, the tanh approximation; the exact
    # erf form moves F0's logits by ~7e-5 (official `base.py:nonlinearities`).
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "glu": jax.nn.glu,
    "leaky_relu": jax.nn.leaky_relu,
    "log_sigmoid": jax.nn.log_sigmoid,
    "log_softmax": jax.nn.log_softmax,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "selu": jax.nn.selu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "soft_sign": jax.nn.soft_sign,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
}


def raw_activation(name: str) -> Activation:
    """The unscaled nonlinearity `name` (jax.nn semantics; GELU in its tanh form)."""
    if name not in _RAW_ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}; choose one of {sorted(_RAW_ACTIVATIONS) + ['identity']}."
        )
    return _RAW_ACTIVATIONS[name]


def _lowered_for(platforms: tuple[str, ...], chosen: Callable[..., Any], otherwise: Callable[..., Any],
                 *args: jax.Array) -> Any:
    """`chosen(*args)` in a program lowered for one of `platforms`, `otherwise(*args)` in any other.

    `jax.lax.platform_dependent` resolves the choice when the program is lowered, so an AOT compile
    for a TPU from a CPU host gets the TPU's branch, not the host's (`jax.default_backend()`)."""
    return jax.lax.platform_dependent(*args, **{platform: chosen for platform in platforms}, default=otherwise)


# Platforms (lowering platform names) on which the backward pass recomputes the activations from
# their inputs rather than keeping XLA's intermediates (`scaled_activation`).
RECOMPUTE_ACTIVATIONS_ON = ("cpu",)


def scaled_activation(name: str) -> Activation:
    """γ·f(x): the variance-preserving nonlinearity the NF models use (official `base.py:nonlinearities`).

    `"identity"` is accepted and has no gain, as in the official table.

    How the backward pass gets f's derivative depends on the platform the step is compiled for
    (`jax.lax.platform_dependent`, resolved when the program is lowered): on the CPU it keeps
    only the activation's input and recomputes the nonlinearity from it (`jax.checkpoint`), which
    made XLA:CPU's F0 training step ~3–4% faster than keeping the tanh-GELU's intermediates
    (`python -m benchmarks.compare_timm`); on GPU and TPU it leaves the choice to XLA, as the
    official code does: on a TPU the recompute adds memory passes that XLA:TPU cannot fuse into
    the convolutions around it (docs/tpu_step_cost_log.md). The values are the same either way.
    """
    if name == "identity":
        return lambda x: x
    fn, gamma = raw_activation(name), ACTIVATION_GAMMAS[name]

    def scaled(x: jax.Array) -> jax.Array:
        return fn(x) * gamma

    recomputed = jax.checkpoint(scaled)
    return lambda x: _lowered_for(RECOMPUTE_ACTIVATIONS_ON, recomputed, scaled, x)


class WSConv2D(hk.Module):
    """2-D convolution with Scaled Weight Standardisation (paper eq. 1, official `base.py:WSConv2D`).

    ŵ = gain · (w − mean) · rsqrt(max(fan_in · var, eps)), with population mean/var over (H, W, I)
    per output channel. Standardising on every call (rather than once) keeps the signal
    variance-preserving throughout training. The bias always exists, as in the official code.
    Padding is XLA's `SAME`, which is TensorFlow's: asymmetric (extra at the end) on stride 2.
    Kernels are HWIO: (kh, kw, in_ch // groups, out_ch).

    `grouped_conv_impl` (`"auto"`, `"xla"`, `"split"`) chooses how a grouped conv is computed,
    never what: `"auto"` splits it into per-group dense convs when compiled for a CPU (up to 16
    groups), where XLA's native grouped-conv weight gradient is 10–1000× slower, and keeps XLA's
    grouped conv when compiled for a GPU or TPU (see `grouped_conv`); for the CPU it also computes
    1×1 convs as matrix products, whose weight gradient XLA:CPU runs 13–20× faster. Parameters and
    their names do not depend on it.
    """

    def __init__(
        self,
        output_channels: int,
        kernel_shape: int,
        stride: int = 1,
        feature_group_count: int = 1,
        eps: float = 1e-4,
        grouped_conv_impl: grouped_conv.GroupedConvImpl = "auto",
        name: str | None = None,
    ):
        super().__init__(name=name)
        grouped_conv.check_impl(grouped_conv_impl)  # Rejects unknown names at construction.
        self.output_channels = output_channels
        self.kernel_shape = kernel_shape
        self.stride = stride
        self.feature_group_count = feature_group_count
        self.eps = eps
        self.grouped_conv_impl = grouped_conv_impl

    def standardized_weight(self, in_channels: int, dtype: jnp.dtype) -> jax.Array:
        """Creates (or fetches) `w` and `gain` and returns the standardised kernel."""
        if in_channels % self.feature_group_count:
            raise ValueError(
                f"{self.module_name}: {in_channels} input channels are not divisible by "
                f"{self.feature_group_count} groups; pick a group size that divides the width."
            )
        k = self.kernel_shape
        shape = (k, k, in_channels // self.feature_group_count, self.output_channels)
        w_init = hk.initializers.VarianceScaling(1.0, "fan_in", "normal")
        w = hk.get_parameter("w", shape, dtype, init=w_init)
        gain = hk.get_parameter("gain", (self.output_channels,), dtype, init=jnp.ones)
        return standardize_weight(w, gain, self.eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.standardized_weight(x.shape[-1], x.dtype)
        out = grouped_conv.conv2d_same(x, weight, self.stride, self.feature_group_count, self.grouped_conv_impl)
        bias = hk.get_parameter("bias", (self.output_channels,), x.dtype, init=jnp.zeros)
        return out + bias


def _per_channel_view(w: jax.Array, as_rows: bool) -> tuple[jax.Array, tuple[int, ...], Callable[[jax.Array], jax.Array]]:
    """(w as the standardisation reads it, the axes its per-channel statistics reduce, the map back
    to w's shape). `as_rows`: w reshaped to [fan_in, out] rows, reduced over axis 0; else w as it
    is, in the parameters' layout (`_in_parameter_layout`), reduced over every axis but the last."""
    if as_rows:
        return w.reshape(-1, w.shape[-1]), (0,), lambda x: x.reshape(w.shape)
    return _in_parameter_layout(w), tuple(range(w.ndim - 1)), lambda x: x


def _in_parameter_layout(w: jax.Array) -> jax.Array:
    """w pinned to the row-major layout the train state stores every parameter in, and so (the
    constraint's transpose) is its gradient.

    Left free, XLA:TPU's layout assignment carries the layout a grouped convolution wants for its
    kernel (input features minor) back through the standardisation to the float32 parameter, and
    the gradient comes out of the backward pass in that layout too; the optimizer's update then
    runs in it, copying the parameter, its momentum and its EMA there and back: six float32
    copies of every 3×3 kernel per step. Pinned, the one relayout is of the bf16 standardised
    kernel before the convolution and of its gradient after it. F0's bare step on a TPUv3 core:
    35.92 ms and 10.72 GB accessed, against 37.67 ms and 11.47 GB unpinned (docs/tpu_step_cost_log.md).
    Reshaping the kernel into rows pins it as well, but costs the v3 compiler temporaries under
    memory pressure (`_on_lowering_platform`)."""
    return with_layout_constraint(w, Layout(major_to_minor=tuple(range(w.ndim))))


def _standardization_stats(view: jax.Array, axes: tuple[int, ...], eps: float
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-output mean, r = rsqrt(max(fan_in·var, eps)), r's floor inactive), kept broadcastable."""
    fan_in = int(np.prod([view.shape[axis] for axis in axes]))
    mean = jnp.mean(view, axis=axes, keepdims=True)
    scaled_var = jnp.mean(jnp.square(view - mean), axis=axes, keepdims=True) * fan_in
    return mean, jax.lax.rsqrt(jnp.maximum(scaled_var, eps)), scaled_var > eps


STANDARDIZE_ON_ROWS_ON = ("cpu",)  # platforms whose weight standardisation reduces [fan_in, out] rows


def _on_lowering_platform(fn: Callable[..., Any], *args: jax.Array) -> Any:
    """`fn(*args, as_rows=...)` with the layout the platform the program is lowered for computes
    best (`jax.lax.platform_dependent`, resolved when lowered): rows on the CPU, where XLA:CPU
    reduces a row axis 3–4× faster than the leading axes of a kernel (the gradient of every F0
    kernel's standardisation), the kernel as it is elsewhere, pinned to the parameters' layout
    (`_in_parameter_layout`): on a TPU the reshape into rows cost the v3 compiler 3.4 GB more
    temporaries for F5's step under memory pressure (19.19 against 15.81 GB), enough that F4's
    step did not fit a v3 core without remat (docs/tpu_step_cost_log.md)."""
    return _lowered_for(STANDARDIZE_ON_ROWS_ON, functools.partial(fn, as_rows=True),
                        functools.partial(fn, as_rows=False), *args)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def standardize_weight(w: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    """Scaled Weight Standardisation: ŵ = gain · (w − mean) · rsqrt(max(fan_in · var, eps)).

    Mean and population variance are per output channel (the last axis) over all other axes
    (paper eq. 1, official `base.py:WSConv2D.standardize_weight`). The derivative is written out
    by hand (`_standardize_weight_jvp`): JAX's own derivative of the mean/var reductions runs ~10×
    slower on XLA:CPU (jax 0.10; F0's `final_conv`, 1536×3072: 73 ms against 8 ms), and the whole
    F0 training step ~10% slower. As a JVP rule it serves forward mode, reverse mode (JAX
    transposes it) and higher derivatives alike; tests/test_layers.py checks it against the
    autodiff of the plain formula. How the statistics are laid out depends on the platform the
    program is compiled for, never what they are (`_on_lowering_platform`).
    """
    return _on_lowering_platform(functools.partial(_standardized, eps=eps), w, gain)


def _standardized(w: jax.Array, gain: jax.Array, *, eps: float, as_rows: bool) -> jax.Array:
    """The value of `standardize_weight` with its statistics laid out as `as_rows` says."""
    view, axes, restore = _per_channel_view(w, as_rows)
    mean, r, _ = _standardization_stats(view, axes, eps)
    return restore((view - mean) * (r * gain))


@standardize_weight.defjvp
def _standardize_weight_jvp(eps: float, primals: tuple[jax.Array, jax.Array],
                            tangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return _on_lowering_platform(functools.partial(_standardized_jvp, eps=eps), *primals, *tangents)


def _standardized_jvp(w: jax.Array, gain: jax.Array, dw: jax.Array, dgain: jax.Array, *, eps: float,
                      as_rows: bool) -> tuple[jax.Array, jax.Array]:
    """(ŵ, dŵ) of `standardize_weight` with its statistics laid out as `as_rows` says."""
    # With c = w − mean, r = rsqrt(fan_in·var) and s = gain·r (Σc = 0 per channel):
    #   dŵ = s·(dw − mean(dw)) − s·r²·Σ(c·dw)·c + r·c·dgain,
    # the middle term vanishing while the eps floor holds r constant.
    view, axes, restore = _per_channel_view(w, as_rows)
    d_view = _per_channel_view(dw, as_rows)[0]
    mean, r, floor_inactive = _standardization_stats(view, axes, eps)
    centred, scale = view - mean, r * gain
    projection = jnp.where(floor_inactive, r * r * jnp.sum(centred * d_view, axis=axes, keepdims=True), 0.0)
    d_out = (scale * (d_view - jnp.mean(d_view, axis=axes, keepdims=True) - projection * centred)
             + centred * (r * dgain))
    return restore(centred * scale), restore(d_out)


class SqueezeExcite(hk.Module):
    """Squeeze-excite gate σ(W1·relu(W0·mean_hw(x))), shape [B, 1, 1, C] (official `base.SqueezeExcite`).

    Hidden width is max(1, int(in_ch·ratio)). The ReLU is the plain, unscaled one (the paper's
    App. C says GELU, the code and the released weights use ReLU; docs/official_code_notes.md). Callers
    multiply the gate by 2 so that it is 1 on average at init.
    """

    def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.5, name: str | None = None):
        super().__init__(name=name)
        self.hidden_ch = max(1, int(in_ch * se_ratio))
        self.out_ch = out_ch
        # Built here, not in __call__, so Haiku names them `squeeze_excite/~/linear` as DeepMind's do.
        self.fc0 = hk.Linear(self.hidden_ch, name="linear")
        self.fc1 = hk.Linear(self.out_ch, name="linear_1")

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.mean(x, axis=(1, 2))
        h = self.fc1(jax.nn.relu(self.fc0(h)))
        return jax.nn.sigmoid(h)[:, None, None, :]


def stochastic_depth(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
    """Drops the whole residual branch per example with probability `rate` (official `StochDepth`).

    There is deliberately **no** 1/keep rescale (official `scale_by_keep=False`), so the expected
    branch scale differs between training and evaluation, exactly as in the released models.
    Identity at eval or when `rate` is 0. Needs an RNG (`hk.next_rng_key`) in training.
    """
    if not is_training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    uniform = jax.random.uniform(hk.next_rng_key(), (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    return x * jnp.floor(keep + uniform)


def skip_gain(dtype: jnp.dtype, init: Callable = jnp.zeros) -> jax.Array:
    """The scalar SkipInit gain at the end of each residual branch; zeros => identity block at init."""
    return hk.get_parameter("skip_gain", (), dtype, init=init)


@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """Per-block constants of an NF network, fixed at construction (official `nfnet.py:NFNet`).

    beta: 1/expected_std of the block's input; the branch sees act(x)·beta with unit variance.
    expected_std: the analytic std of the block's *output* (sqrt(var_in_after_reset + α²)).
    stochdepth_rate: `rate · index / num_blocks` (index from 0, so the last rate is < `rate`).
    stride: the stage stride on the first block of a stage, else 1.
    is_transition: first block of a stage.
    stage: 1-based stage number.
    """

    beta: float
    expected_std: float
    stochdepth_rate: float
    stride: int
    is_transition: bool
    stage: int


def block_schedule(
    depths: Sequence[int], strides: Sequence[int], alpha: float, stochdepth_rate: float
) -> list[BlockSchedule]:
    """α/β bookkeeping and stochastic-depth schedule for every block, in order.

    NF-ResNet paper §3 / NFNet paper §3: h_{i+1} = h_i + α·f(h_i/β_i) with β_i = sqrt(Var(h_i)),
    Var(h_{i+1}) = Var(h_i) + α². A transition block's shortcut is taken from the
    standardised input, so the variance resets to 1 after it, and then grows by α².
    """
    if len(depths) != len(strides) or any(int(d) < 1 for d in depths):
        raise ValueError(f"Need one depth >= 1 per stage ({len(strides)} stages); got depths {tuple(depths)}.")
    num_blocks = sum(depths)
    expected_std = 1.0
    schedule = []
    index = 0
    for stage, (depth, stride) in enumerate(zip(depths, strides), start=1):
        for block_index in range(depth):
            beta = 1.0 / expected_std
            if block_index == 0:
                expected_std = 1.0
            expected_std = (expected_std**2 + alpha**2) ** 0.5
            schedule.append(
                BlockSchedule(
                    beta=beta,
                    expected_std=expected_std,
                    stochdepth_rate=stochdepth_rate * index / num_blocks,
                    stride=stride if block_index == 0 else 1,
                    is_transition=block_index == 0,
                    stage=stage,
                )
            )
            index += 1
    return schedule


def block_widths(depths: Sequence[int], widths: Sequence[int]) -> list[int]:
    """Output channels of every block, in order (stage width repeated `depth` times)."""
    return [w for depth, w in zip(depths, widths) for _ in range(depth)]


def pooled_shortcut(
    x: jax.Array, pre: jax.Array, stride: int, conv_shortcut: Callable[[jax.Array], jax.Array] | None
) -> jax.Array:
    """NFNet / NF-RegNet shortcut: 2×2 avg-pool then 1×1 conv of `pre` = act(x)·β when strided,
    the 1×1 conv of `pre` on a channel change (`conv_shortcut` given), else the raw `x`."""
    if stride > 1:
        pre = hk.avg_pool(pre, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="SAME")
    return conv_shortcut(pre) if conv_shortcut is not None else x


def channel_variance(x: jax.Array) -> jax.Array:
    """Mean over channels of the per-channel variance over (N, H, W): the SPP "average channel
    variance" (NF-ResNet paper §4, official `base.signal_metrics`)."""
    return jnp.mean(jnp.var(x, axis=tuple(range(x.ndim - 1))))


def check_image_batch(x: jax.Array, model_name: str) -> None:
    """Rejects inputs that are not NHWC float images, with a message that says what to pass."""
    if x.ndim != 4:
        raise ValueError(
            f"{model_name} expects NHWC images of rank 4 [batch, height, width, channels]; "
            f"got shape {tuple(x.shape)}. Add a batch axis or transpose from NCHW."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{model_name} expects float images (normalised); got dtype {x.dtype}. "
            "Cast and normalise uint8 images first."
        )


def run_body_and_head(
    model: Any,
    stem_out: jax.Array,
    is_training: bool,
    return_features: bool,
    pre_pool: Callable[[jax.Array], jax.Array],
) -> jax.Array | dict[str, Any]:
    """The part every model here shares: blocks → `pre_pool` → spatial mean → dropout → linear.

    `pre_pool` maps the last block's output to the activations that are pooled (NFNet:
    act(final_conv(x)); NF-ResNet: act(x); BN-ResNet: relu(final_bn(x))). `model` provides
    `blocks` (each returns (out, branch_variance) and knows its 1-based `stage`), `drop_rate`
    and `fc`, and optionally `remat` (True: `hk.remat` around every block, the same numbers for
    less activation memory). Returns logits, or with `return_features` the dict documented on
    `NFNet`: `logits`, `pool` (pre-dropout), `stem`, `stage_1`…`stage_4`, `block_outputs`,
    `branch_variances`.
    """
    features: dict[str, Any] = {"stem": stem_out, "block_outputs": [], "branch_variances": []}
    out = stem_out
    for block in model.blocks:
        call = lambda h, block=block: block(h, is_training)
        if getattr(model, "remat", False):
            # Keep only each block's input for the backward pass and recompute the rest: activation
            # memory of one block instead of all of them, for about one more forward pass.
            call = hk.remat(call)
        out, branch_variance = call(out)
        features["block_outputs"].append(out)
        features["branch_variances"].append(branch_variance)
        features[f"stage_{block.stage}"] = out
    pool = jnp.mean(pre_pool(out), axis=(1, 2))
    features["pool"] = pool
    if is_training and model.drop_rate > 0.0:
        pool = hk.dropout(hk.next_rng_key(), model.drop_rate, pool)
    features["logits"] = model.fc(pool)
    return features if return_features else features["logits"]
