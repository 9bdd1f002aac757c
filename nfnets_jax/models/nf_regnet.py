"""NF-RegNets B0–B8 (Brock, De & Smith, ICLR 2021, §5 and App.; official `nf_regnet.py`,
`base.nf_regnet_params`, `experiment_nf_regnets.py`).

EfficientNet-like inverted bottlenecks without normalisation: 1×1 expand (×2.25, but ×1 for the
very first block) → 3×3 grouped conv (group width 8, strided) → 2·SE on the expanded width →
1×1 project, with the NF α/β bookkeeping; a 3×3/2 stem, stride 2 in every stage, and a final
1×1 conv to int(1280·ch // 440) channels (official `nf_regnet.py:NF_RegNet`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers
from nfnets_jax.models.grouped_conv import GroupedConvImpl

_STAGE_STRIDES = (2, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class NFRegNetVariant:
    """One row of `base.nf_regnet_params`; widths are before the 0.75 width multiplier."""

    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    train_imsize: int
    test_imsize: int
    drop_rate: float


NF_REGNET_VARIANTS: dict[str, NFRegNetVariant] = {
    "B0": NFRegNetVariant((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    "B1": NFRegNetVariant((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    "B2": NFRegNetVariant((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    "B3": NFRegNetVariant((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    "B4": NFRegNetVariant((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    "B5": NFRegNetVariant((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    "B6": NFRegNetVariant((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    "B7": NFRegNetVariant((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
    "B8": NFRegNetVariant((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
}


class NFRegNetBlock(hk.Module):
    """Inverted bottleneck; the shortcut follows the NFNet rule (avg-pool then 1×1 conv on
    act(x)·β when strided, 1×1 conv on a channel change, raw x otherwise)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        schedule: layers.BlockSchedule,
        activation: layers.Activation,
        expansion: float = 2.25,
        se_ratio: float | None = 0.5,
        group_size: int = 8,
        alpha: float = 0.2,
        grouped_conv_impl: GroupedConvImpl = "auto",
        name: str | None = None,
    ):
        super().__init__(name=name)
        groups = int(in_ch * expansion) // group_size
        if groups < 1:
            raise ValueError(
                f"Expanded width {in_ch}·{expansion} is smaller than group_size {group_size}; "
                "lower group_size or raise the widths."
            )
        mid = groups * group_size
        self.schedule = schedule
        self.stage = schedule.stage
        self.activation = activation
        self.alpha = alpha
        self.use_projection = schedule.stride > 1 or in_ch != out_ch
        self.conv0 = layers.WSConv2D(mid, 1, name="conv0")
        self.conv1 = layers.WSConv2D(
            mid,
            3,
            stride=schedule.stride,
            feature_group_count=groups,
            grouped_conv_impl=grouped_conv_impl,
            name="conv1",
        )
        self.squeeze_excite = (
            layers.SqueezeExcite(mid, mid, se_ratio, name="squeeze_excite") if se_ratio is not None else None
        )
        self.conv2 = layers.WSConv2D(out_ch, 1, name="conv2")
        if self.use_projection:
            self.conv_shortcut = layers.WSConv2D(out_ch, 1, name="conv_shortcut")

    def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
        """Returns (block output, average channel variance of the residual branch)."""
        out = self.activation(x) * self.schedule.beta
        conv_shortcut = self.conv_shortcut if self.use_projection else None
        shortcut = layers.pooled_shortcut(x, out, self.schedule.stride, conv_shortcut)
        out = self.conv0(out)
        out = self.conv1(self.activation(out))
        if self.squeeze_excite is not None:
            out = 2.0 * self.squeeze_excite(out) * out
        out = self.conv2(self.activation(out))
        branch_variance = layers.channel_variance(out)
        out = layers.stochastic_depth(out, self.schedule.stochdepth_rate, is_training)
        out = out * layers.skip_gain(out.dtype)
        return out * self.alpha + shortcut, branch_variance


class NFRegNet(hk.Module):
    """Normalizer-Free RegNet (official `nf_regnet.NF_RegNet`).

    `model(x, is_training, return_features=False)` as for `NFNet` (see its docstring for the
    features dict). Defaults are the experiment config's: width 0.75, expansion 2.25, group
    width 8, SE 0.5, α 0.2, stochastic depth 0.1, SiLU (the official class default 'swish'
    is not in its own activation table), zero-initialised classifier. `grouped_conv_impl` chooses
    how the grouped 3×3 convs are computed, not the result (see `NFNet`, `models/grouped_conv.py`).
    """

    def __init__(
        self,
        num_classes: int,
        variant: str = "B0",
        width: float = 0.75,
        expansion: float = 2.25,
        group_size: int = 8,
        se_ratio: float | None = 0.5,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        drop_rate: float | None = None,
        activation: str = "silu",
        fc_init: Callable[[Sequence[int], Any], jax.Array] | None = None,
        grouped_conv_impl: GroupedConvImpl = "auto",
        remat: bool = False,
        name: str = "NF_RegNet",
    ):
        super().__init__(name=name)
        if variant not in NF_REGNET_VARIANTS:
            raise ValueError(f"Unknown NF-RegNet variant {variant!r}; choose one of {list(NF_REGNET_VARIANTS)}.")
        spec = NF_REGNET_VARIANTS[variant]
        self.depths = spec.depths
        self.widths = tuple(int(w * width) for w in spec.widths)
        self.drop_rate = spec.drop_rate if drop_rate is None else drop_rate
        self.remat = remat  # recompute each block in the backward pass (layers.run_body_and_head)
        self.activation = layers.scaled_activation(activation)
        self.schedule = layers.block_schedule(self.depths, _STAGE_STRIDES, alpha, stochdepth_rate)

        in_ch = self.widths[0]
        self.initial_conv = layers.WSConv2D(in_ch, 3, stride=2, name="initial_conv")
        self.blocks = []
        out_chs = layers.block_widths(self.depths, self.widths)
        for index, (block_schedule, out_ch) in enumerate(zip(self.schedule, out_chs)):
            self.blocks.append(
                NFRegNetBlock(
                    in_ch,
                    out_ch,
                    block_schedule,
                    self.activation,
                    # Expansion 1 for the very first block, following EfficientNet.
                    expansion=1.0 if index == 0 else expansion,
                    se_ratio=se_ratio,
                    group_size=group_size,
                    alpha=alpha,
                    grouped_conv_impl=grouped_conv_impl,
                    name="nf_block",
                )
            )
            in_ch = out_ch
        self.final_conv = layers.WSConv2D(int(1280 * in_ch // 440), 1, name="final_conv")
        self.fc = hk.Linear(num_classes, w_init=fc_init if fc_init is not None else jnp.zeros, name="linear")

    def __call__(
        self, x: jax.Array, is_training: bool, return_features: bool = False
    ) -> jax.Array | dict[str, Any]:
        layers.check_image_batch(x, "NFRegNet")
        out = self.initial_conv(x)
        return layers.run_body_and_head(
            self, out, is_training, return_features, lambda h: self.activation(self.final_conv(h))
        )
