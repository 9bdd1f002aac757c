"""NF-ResNets (Brock, De & Smith, ICLR 2021, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets", §3–§4; official `nf_resnet.py`).

A pre-activation bottleneck ResNet without normalisation: Scaled WS convs, γ-scaled ReLU, the
α/β variance bookkeeping and a zero-initialised scalar skip gain (official `nf_resnet.py:NFResNet`).
Parameter names and shapes match DeepMind's (`NF_ResNet/~/nf_res_block_3/~/conv1/w`, …).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers

_STAGE_STRIDES = (1, 2, 2, 2)
_BASE_WIDTHS = (64, 128, 256, 512)  # × `width` (default 4 → 256…2048).


@dataclasses.dataclass(frozen=True)
class NFResNetVariant:
    depths: tuple[int, int, int, int]


NF_RESNET_VARIANTS: dict[str, NFResNetVariant] = {
    "ResNet50": NFResNetVariant((3, 4, 6, 3)),
    "ResNet101": NFResNetVariant((3, 4, 23, 3)),
    "ResNet152": NFResNetVariant((3, 8, 36, 3)),
    "ResNet200": NFResNetVariant((3, 24, 36, 3)),
    "ResNet288": NFResNetVariant((24, 24, 24, 24)),
    "ResNet600": NFResNetVariant((50, 50, 50, 50)),
}


class NFResBlock(hk.Module):
    """Pre-activation bottleneck 1×1 → 3×3 (strided, not grouped) → 1×1, mid = 0.25·out_ch,
    optional 2·SE, stochastic depth, scalar skip gain, ×α, plus the shortcut.

    Transition blocks take the shortcut through a *strided* 1×1 conv of act(x)·β (no avg-pool,
    unlike NFNet); other blocks add the raw x (official `nf_resnet.py:NFResBlock`).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        schedule: layers.BlockSchedule,
        activation: layers.Activation,
        bottleneck_ratio: float = 0.25,
        alpha: float = 0.2,
        use_se: bool = False,
        se_ratio: float = 0.25,
        skipinit_gain: Callable = jnp.zeros,
        name: str | None = None,
    ):
        super().__init__(name=name)
        mid = int(out_ch * bottleneck_ratio)
        stride = schedule.stride
        self.schedule = schedule
        self.stage = schedule.stage
        self.activation = activation
        self.alpha = alpha
        self.skipinit_gain = skipinit_gain
        self.use_projection = stride > 1 or in_ch != out_ch
        self.conv0 = layers.WSConv2D(mid, 1, name="conv0")
        self.conv1 = layers.WSConv2D(mid, 3, stride=stride, name="conv1")
        self.conv2 = layers.WSConv2D(out_ch, 1, name="conv2")
        if self.use_projection:
            self.conv_shortcut = layers.WSConv2D(out_ch, 1, stride=stride, name="conv_shortcut")
        self.squeeze_excite = (
            layers.SqueezeExcite(out_ch, out_ch, se_ratio, name="squeeze_excite") if use_se else None
        )

    def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
        """Returns (block output, average channel variance of the residual branch)."""
        out = self.activation(x) * self.schedule.beta
        shortcut = self.conv_shortcut(out) if self.use_projection else x
        out = self.conv0(out)
        out = self.conv1(self.activation(out))
        out = self.conv2(self.activation(out))
        if self.squeeze_excite is not None:
            out = 2.0 * self.squeeze_excite(out) * out
        branch_variance = layers.channel_variance(out)
        out = layers.stochastic_depth(out, self.schedule.stochdepth_rate, is_training)
        out = out * layers.skip_gain(out.dtype, self.skipinit_gain)
        return out * self.alpha + shortcut, branch_variance


class NFResNet(hk.Module):
    """Normalizer-Free ResNet (official `nf_resnet.NFResNet`).

    `model(x, is_training, return_features=False)` as for `NFNet` (see its docstring for the
    features dict). Stem: 7×7/2 WSConv to 16·width channels (its bias is created, as in the
    official code), then a 3×3/2 SAME max-pool. Head: act → mean → dropout → linear.

    `drop_rate` defaults to 0 (the official class has no per-variant rate and fails without
    one). `skipinit_gain` (default zeros) sets the skip-gain initialiser; ones gives the
    "no SkipInit" network used for signal-propagation plots. `depths` overrides the variant's
    depths for tiny models.
    """

    def __init__(
        self,
        num_classes: int,
        variant: str = "ResNet50",
        width: int = 4,
        se_ratio: float = 0.25,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        drop_rate: float = 0.0,
        activation: str = "relu",
        fc_init: Callable[[Sequence[int], Any], jax.Array] | None = None,
        skipinit_gain: Callable = jnp.zeros,
        use_se: bool = False,
        depths: Sequence[int] | None = None,
        remat: bool = False,
        name: str = "NF_ResNet",
    ):
        super().__init__(name=name)
        if variant not in NF_RESNET_VARIANTS:
            raise ValueError(f"Unknown NF-ResNet variant {variant!r}; choose one of {list(NF_RESNET_VARIANTS)}.")
        self.depths = tuple(depths) if depths is not None else NF_RESNET_VARIANTS[variant].depths
        if len(self.depths) != 4:
            raise ValueError(f"depths needs 4 entries (one per stage); got {self.depths}.")
        self.widths = tuple(int(w * width) for w in _BASE_WIDTHS)
        self.drop_rate = drop_rate
        self.remat = remat  # recompute each block in the backward pass (layers.run_body_and_head)
        self.activation = layers.scaled_activation(activation)
        self.schedule = layers.block_schedule(self.depths, _STAGE_STRIDES, alpha, stochdepth_rate)

        in_ch = int(16 * width)
        self.initial_conv = layers.WSConv2D(in_ch, 7, stride=2, name="initial_conv")
        self.blocks = []
        out_chs = layers.block_widths(self.depths, self.widths)
        for block_schedule, out_ch in zip(self.schedule, out_chs):
            self.blocks.append(
                NFResBlock(
                    in_ch,
                    out_ch,
                    block_schedule,
                    self.activation,
                    alpha=alpha,
                    use_se=use_se,
                    se_ratio=se_ratio,
                    skipinit_gain=skipinit_gain,
                    name="nf_res_block",
                )
            )
            in_ch = out_ch
        fc_init = fc_init if fc_init is not None else hk.initializers.RandomNormal(stddev=0.01)
        self.fc = hk.Linear(num_classes, w_init=fc_init, name="linear")

    def __call__(
        self, x: jax.Array, is_training: bool, return_features: bool = False
    ) -> jax.Array | dict[str, Any]:
        layers.check_image_batch(x, "NFResNet")
        out = self.initial_conv(x)
        out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
        return layers.run_body_and_head(self, out, is_training, return_features, self.activation)
