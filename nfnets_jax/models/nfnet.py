"""NFNet-F0…F7 and the wide F0+…F7+ (Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization", §5, Table 1, App. C; official `nfnet.py` / `base.py`).

With default arguments the module, its parameter names and shapes, and its outputs are those of
DeepMind's `NFNet` (docs/official_code_notes.md), so released weights load by name. The extra knobs
`depths`, `widths`, `group_size` and `stem_channels` only exist to build tiny models for CPU runs.

`norm="batchnorm"` builds the normalised counterpart of the same architecture, the "+BN"
baseline of the paper's ablations (§3, §5): BatchNorm before every activation instead of
Scaled Weight Standardisation, plain (unscaled) activations, no α/β variance bookkeeping
(β = 1, α = 1). Everything else — stem, block layout, grouped convs, squeeze-excite, skip gain,
stochastic depth, head — is shared, so the two differ only in normalisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax

from nfnets_jax.models import grouped_conv, layers
from nfnets_jax.models.grouped_conv import GroupedConvImpl

NORMS = ("none", "batchnorm")  # NF (the default) or the BatchNorm baseline

_STAGE_STRIDES = (1, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class NFNetVariant:
    """One row of the paper's Table 1 (plus the official code's F7 and F+ rows)."""

    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    train_imsize: int
    test_imsize: int
    drop_rate: float
    randaugment_magnitude: int  # RandAugment uses 4 layers for every variant (paper App. A.3).


_BASE_WIDTHS = (256, 512, 1536, 1536)
_PLUS_WIDTHS = (384, 768, 2048, 2048)  # official `base.py` "F+" rows: widths only differ.
# (train px, test px, dropout, RandAugment magnitude) for F0…F7; depths are (k+1)·[1, 2, 6, 3].
_F_SETTINGS = (
    (192, 256, 0.2, 5),
    (224, 320, 0.3, 10),
    (256, 352, 0.4, 10),
    (320, 416, 0.4, 15),
    (384, 512, 0.5, 15),
    (416, 544, 0.5, 15),
    (448, 576, 0.5, 15),
    (480, 608, 0.5, 15),
)


def _make_variants() -> dict[str, NFNetVariant]:
    variants = {}
    for k, (train_px, test_px, drop, magnitude) in enumerate(_F_SETTINGS):
        depths = tuple((k + 1) * d for d in (1, 2, 6, 3))
        for suffix, widths in (("", _BASE_WIDTHS), ("+", _PLUS_WIDTHS)):
            variants[f"F{k}{suffix}"] = NFNetVariant(
                depths=depths,
                widths=widths,
                train_imsize=train_px,
                test_imsize=test_px,
                drop_rate=drop,
                randaugment_magnitude=magnitude,
            )
    return variants


NFNET_VARIANTS: dict[str, NFNetVariant] = _make_variants()


class Conv2D(hk.Module):
    """The `norm="batchnorm"` conv: `WSConv2D` without the standardisation and the bias (the
    BatchNorm that follows has an offset), He-normal init, computed by the same
    `grouped_conv.conv2d_same` so that both norms run the same convolution code."""

    def __init__(self, output_channels: int, kernel_shape: int, stride: int = 1, feature_group_count: int = 1,
                 grouped_conv_impl: GroupedConvImpl = "auto", name: str | None = None):
        super().__init__(name=name)
        self.output_channels, self.kernel_shape, self.stride = output_channels, kernel_shape, stride
        self.feature_group_count, self.grouped_conv_impl = feature_group_count, grouped_conv_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_shape
        shape = (k, k, x.shape[-1] // self.feature_group_count, self.output_channels)
        w = hk.get_parameter("w", shape, x.dtype, init=hk.initializers.VarianceScaling(2.0, "fan_in", "normal"))
        return grouped_conv.conv2d_same(x, w, self.stride, self.feature_group_count, self.grouped_conv_impl)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {NORMS}.")


def _conv_class(norm: str):
    return layers.WSConv2D if norm == "none" else Conv2D


def _batch_norm(name: str) -> hk.BatchNorm:
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9, eps=1e-5, name=name)


class NFBlock(hk.Module):
    """NFNet bottleneck: 1×1 → 3×3 grouped (strided) → 3×3 grouped → 1×1, then 2·SE, stochastic
    depth, scalar skip gain and ×α, plus the shortcut (official `nfnet.py:NFBlock`).

    The shortcut of a transition block is taken from act(x)·β (average-pooled if strided);
    otherwise the raw x (official `NFBlock`). Bottleneck width is expansion × **output** channels,
    rounded down to a multiple of `group_size`.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        schedule: layers.BlockSchedule,
        activation: layers.Activation,
        expansion: float = 0.5,
        se_ratio: float = 0.5,
        group_size: int = 128,
        alpha: float = 0.2,
        use_two_convs: bool = True,
        grouped_conv_impl: GroupedConvImpl = "auto",
        norm: str = "none",
        name: str | None = None,
    ):
        super().__init__(name=name)
        _check_norm(norm)
        mid = int(out_ch * expansion)
        groups = mid // group_size
        if groups < 1:
            raise ValueError(
                f"Block width {out_ch}·{expansion} = {mid} is smaller than group_size "
                f"{group_size}; lower group_size or raise the widths."
            )
        self.in_ch, self.out_ch = in_ch, out_ch
        self.mid, self.groups = groups * group_size, groups
        self.schedule = schedule
        self.stage = schedule.stage
        self.activation = activation
        # BatchNorm replaces the NF variance bookkeeping: no input scaling β, no branch scaling α.
        self.alpha = alpha if norm == "none" else 1.0
        self.beta = schedule.beta if norm == "none" else 1.0
        self.use_two_convs = use_two_convs
        self.use_projection = schedule.stride > 1 or in_ch != out_ch
        # Submodules are built here (not in __call__) so Haiku names them `nf_block/~/conv0`, …
        mid, stride = self.mid, schedule.stride
        conv = _conv_class(norm)
        self.conv0 = conv(mid, 1, name="conv0")
        grouped = dict(feature_group_count=groups, grouped_conv_impl=grouped_conv_impl)
        self.conv1 = conv(mid, 3, stride=stride, **grouped, name="conv1")
        if use_two_convs:
            self.conv1b = conv(mid, 3, **grouped, name="conv1b")
        self.conv2 = conv(out_ch, 1, name="conv2")
        if self.use_projection:
            self.conv_shortcut = conv(out_ch, 1, name="conv_shortcut")
        # With norm="batchnorm": one BatchNorm before each activation (input, conv0, conv1, conv1b).
        self.norms = None
        if norm == "batchnorm":
            names = ("bn0", "bn1", "bn1b", "bn2") if use_two_convs else ("bn0", "bn1", "bn2")
            self.norms = [_batch_norm(name) for name in names]
        self.squeeze_excite = layers.SqueezeExcite(out_ch, out_ch, se_ratio, name="squeeze_excite")

    def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
        """Returns (block output, average channel variance of the residual branch)."""
        norms = iter(self.norms or ())

        def pre_activation(h: jax.Array) -> jax.Array:  # act(h), or act(BN(h)) with norm="batchnorm"
            return self.activation(next(norms)(h, is_training) if self.norms else h)

        out = pre_activation(x) * self.beta
        conv_shortcut = self.conv_shortcut if self.use_projection else None
        shortcut = layers.pooled_shortcut(x, out, self.schedule.stride, conv_shortcut)
        out = self.conv0(out)
        out = self.conv1(pre_activation(out))
        if self.use_two_convs:
            out = self.conv1b(pre_activation(out))
        out = self.conv2(pre_activation(out))
        out = 2.0 * self.squeeze_excite(out) * out
        branch_variance = layers.channel_variance(out)
        out = layers.stochastic_depth(out, self.schedule.stochdepth_rate, is_training)
        out = out * layers.skip_gain(out.dtype)
        return out * self.alpha + shortcut, branch_variance


class NFNet(hk.Module):
    """Normalizer-Free Network (paper §5, official `nfnet.py:NFNet`).

    Call as `model(x, is_training, return_features=False)` on NHWC float images.
    - Default: logits [B, num_classes].
    - `return_features=True`: a dict with `logits`, `pool` (pre-dropout pooled features, the
      input of the classifier), `stem` (stem output), `stage_1`…`stage_4` (output of the last
      block of each stage, before the head), and for signal-propagation plots `block_outputs`
      (every block's output, in order) and `branch_variances` (per block, the average channel
      variance of the residual branch before stochastic depth, skip gain and α: the official
      `res_avg_var`).
    Training (`is_training=True`) needs an RNG for dropout and stochastic depth.
    `grouped_conv_impl` only chooses how the 3×3 grouped convs are computed (`"auto"`: per-group
    dense convs on CPU, several times faster to train there; XLA's grouped conv elsewhere); the
    parameters and the results do not depend on it (`models/grouped_conv.py`).
    `norm="batchnorm"` builds the BatchNorm baseline of the same architecture (module doc);
    it has Haiku state (`hk.transform_with_state`) and, like `BNResNet`, `init` always takes
    the training path. `remat=True` recomputes each block's activations in the backward pass
    instead of storing them (`hk.remat`): less memory, about one extra forward pass of time, the
    same parameters and numbers.
    """

    def __init__(
        self,
        num_classes: int,
        variant: str = "F0",
        width: float = 1.0,
        se_ratio: float = 0.5,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        drop_rate: float | None = None,
        activation: str = "gelu",
        fc_init: Callable[[Sequence[int], Any], jax.Array] | None = None,
        final_conv_mult: float | None = 2,
        final_conv_ch: int | None = None,
        use_two_convs: bool = True,
        depths: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        group_size: int = 128,
        stem_channels: Sequence[int] | None = None,
        grouped_conv_impl: GroupedConvImpl = "auto",
        norm: str = "none",
        remat: bool = False,
        name: str = "NFNet",
    ):
        super().__init__(name=name)
        _check_norm(norm)
        self.norm = norm
        if variant not in NFNET_VARIANTS:
            raise ValueError(f"Unknown NFNet variant {variant!r}; choose one of {list(NFNET_VARIANTS)}.")
        spec = NFNET_VARIANTS[variant]
        self.num_classes = num_classes
        self.depths = tuple(depths) if depths is not None else spec.depths
        base_widths = tuple(widths) if widths is not None else spec.widths
        if len(self.depths) != 4 or len(base_widths) != 4:
            raise ValueError(f"depths and widths need 4 entries (one per stage); got {self.depths}, {base_widths}.")
        self.widths = tuple(int(w * width) for w in base_widths)
        # The stem is not scaled by `width` (official `nfnet.py:NFNet`).
        self.stem_channels = (
            tuple(stem_channels) if stem_channels is not None else (16, 32, 64, base_widths[0] // 2)
        )
        if len(self.stem_channels) != 4:
            raise ValueError(f"stem_channels needs 4 entries (one per stem conv); got {self.stem_channels}.")
        if final_conv_mult is None:
            if final_conv_ch is None:
                raise ValueError("Pass final_conv_mult or final_conv_ch to size the final 1x1 conv.")
            self.final_conv_ch = int(final_conv_ch)
        else:
            self.final_conv_ch = int(final_conv_mult * self.widths[-1])
        self.drop_rate = spec.drop_rate if drop_rate is None else drop_rate
        self.remat = remat  # recompute each block in the backward pass (layers.run_body_and_head)
        self.activation_name = activation
        # The γ gains are part of the NF scaling; with BatchNorm the activations are plain.
        self.activation = (layers.scaled_activation(activation) if norm == "none"
                           else layers.raw_activation(activation))
        self.schedule = layers.block_schedule(self.depths, _STAGE_STRIDES, alpha, stochdepth_rate)

        # Submodules are built here, in DeepMind's order, so Haiku names them `NFNet/~/stem_conv0`,
        # `NFNet/~/nf_block`, `NFNet/~/nf_block_1`, …, `NFNet/~/final_conv`, `NFNet/~/linear`.
        conv = _conv_class(norm)
        self.stem = [
            conv(channels, 3, stride=stride, name=f"stem_conv{i}")
            for i, (channels, stride) in enumerate(zip(self.stem_channels, (2, 1, 1, 2)))
        ]
        # norm="batchnorm": BN before each stem activation and before the final activation.
        self.stem_norms = self.final_norm = None
        if norm == "batchnorm":
            self.stem_norms = [_batch_norm(f"stem_bn{i}") for i in range(len(self.stem) - 1)]
            self.final_norm = _batch_norm("final_bn")
        self.blocks = []
        in_ch = self.stem_channels[-1]
        for block_schedule, out_ch in zip(self.schedule, layers.block_widths(self.depths, self.widths)):
            self.blocks.append(
                NFBlock(
                    in_ch,
                    out_ch,
                    block_schedule,
                    self.activation,
                    se_ratio=se_ratio,
                    group_size=group_size,
                    alpha=alpha,
                    use_two_convs=use_two_convs,
                    grouped_conv_impl=grouped_conv_impl,
                    norm=norm,
                    name="nf_block",
                )
            )
            in_ch = out_ch
        self.final_conv = conv(self.final_conv_ch, 1, name="final_conv")
        fc_init = fc_init if fc_init is not None else hk.initializers.RandomNormal(stddev=0.01)
        self.fc = hk.Linear(num_classes, w_init=fc_init, name="linear")

    def __call__(
        self, x: jax.Array, is_training: bool, return_features: bool = False
    ) -> jax.Array | dict[str, Any]:
        layers.check_image_batch(x, "NFNet")
        if self.norm == "batchnorm":
            is_training = is_training or hk.running_init()  # BN creates its averages in training mode
        normalize = lambda h, bn: bn(h, is_training) if bn is not None else h
        stem_norms = self.stem_norms or [None] * (len(self.stem) - 1)
        out = x
        for i, conv in enumerate(self.stem):
            out = conv(out)
            if i < len(self.stem) - 1:  # No activation after the last stem conv: blocks start with one.
                out = self.activation(normalize(out, stem_norms[i]))
        return layers.run_body_and_head(
            self, out, is_training, return_features,
            lambda h: self.activation(normalize(self.final_conv(h), self.final_norm)),
        )
