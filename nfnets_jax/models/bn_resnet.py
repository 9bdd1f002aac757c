"""Pre-activation (v2) BatchNorm ResNet: the normalised baseline of the NF papers.

He et al. 2016, "Identity Mappings in Deep Residual Networks", as in DeepMind's `resnet.py`
(official `resnet.py:ResNet`): BN → ReLU before every conv, a strided 3×3 and a strided 1×1 projection
shortcut on transition blocks, a final BN → ReLU before pooling, `hk.BatchNorm` with decay 0.9,
and a zero-initialised classifier. It is the "BN" row of the NF papers' comparisons and the
reference curve of the signal-propagation plots. Needs `hk.transform_with_state` (BN statistics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers

_STAGE_STRIDES = (1, 2, 2, 2)
_BASE_WIDTHS = (64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class BNResNetVariant:
    depths: tuple[int, int, int, int]


BN_RESNET_VARIANTS: dict[str, BNResNetVariant] = {
    "ResNet50": BNResNetVariant((3, 4, 6, 3)),
    "ResNet101": BNResNetVariant((3, 4, 23, 3)),
    "ResNet152": BNResNetVariant((3, 8, 36, 3)),
    "ResNet200": BNResNetVariant((3, 24, 36, 3)),
}


def _batch_norm(name: str, decay_rate: float) -> hk.BatchNorm:
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=decay_rate, eps=1e-5, name=name)


def _conv(channels: int, kernel: int, stride: int, name: str) -> hk.Conv2D:
    # He-normal init suits the ReLU that precedes every conv; BN makes the scale irrelevant.
    w_init = hk.initializers.VarianceScaling(2.0, "fan_in", "normal")
    return hk.Conv2D(channels, kernel, stride=stride, padding="SAME", with_bias=False, w_init=w_init, name=name)


class PreActBottleneck(hk.Module):
    """BN-ReLU-conv1×1 → BN-ReLU-conv3×3 (strided) → BN-ReLU-conv1×1, plus the shortcut, which
    is the raw x, or a strided 1×1 conv of the first BN-ReLU output on a transition."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, stage: int, decay_rate: float, name: str | None = None
    ):
        super().__init__(name=name)
        mid = out_ch // 4
        self.stage = stage
        self.use_projection = stride > 1 or in_ch != out_ch
        self.bn0 = _batch_norm("bn0", decay_rate)
        self.conv0 = _conv(mid, 1, 1, "conv0")
        self.bn1 = _batch_norm("bn1", decay_rate)
        self.conv1 = _conv(mid, 3, stride, "conv1")
        self.bn2 = _batch_norm("bn2", decay_rate)
        self.conv2 = _conv(out_ch, 1, 1, "conv2")
        if self.use_projection:
            self.conv_shortcut = _conv(out_ch, 1, stride, "conv_shortcut")

    def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
        """Returns (block output, average channel variance of the residual branch)."""
        out = jax.nn.relu(self.bn0(x, is_training))
        shortcut = self.conv_shortcut(out) if self.use_projection else x
        out = self.conv0(out)
        out = self.conv1(jax.nn.relu(self.bn1(out, is_training)))
        out = self.conv2(jax.nn.relu(self.bn2(out, is_training)))
        return out + shortcut, layers.channel_variance(out)


class BNResNet(hk.Module):
    """BatchNorm pre-activation ResNet-50/101/152/200 (`bn_resnet*` in the registry).

    `model(x, is_training, return_features=False)` returns logits, or the features dict of
    `NFNet` (`logits`, `pool`, `stem`, `stage_1`…`stage_4`, `block_outputs`, `branch_variances`).
    In training BN uses batch statistics and updates its moving averages (Haiku state). `init`
    always takes the training path (Haiku creates the moving averages there), so it works with
    either value of `is_training`.
    """

    def __init__(
        self,
        num_classes: int,
        variant: str = "ResNet50",
        width: int = 4,
        drop_rate: float = 0.0,
        bn_decay: float = 0.9,
        depths: Sequence[int] | None = None,
        remat: bool = False,
        name: str = "ResNet",
    ):
        super().__init__(name=name)
        if variant not in BN_RESNET_VARIANTS:
            raise ValueError(f"Unknown BN-ResNet variant {variant!r}; choose one of {list(BN_RESNET_VARIANTS)}.")
        self.depths = tuple(depths) if depths is not None else BN_RESNET_VARIANTS[variant].depths
        if len(self.depths) != 4:
            raise ValueError(f"depths needs 4 entries (one per stage); got {self.depths}.")
        self.drop_rate = drop_rate
        self.remat = remat  # recompute each block in the backward pass (layers.run_body_and_head)
        in_ch = int(16 * width)
        self.initial_conv = _conv(in_ch, 7, 2, "initial_conv")
        self.blocks = []
        for stage, (depth, base_width, stride) in enumerate(zip(self.depths, _BASE_WIDTHS, _STAGE_STRIDES), 1):
            out_ch = int(base_width * width)
            for block_index in range(depth):
                self.blocks.append(
                    PreActBottleneck(
                        in_ch, out_ch, stride if block_index == 0 else 1, stage, bn_decay, name="res_block_v2"
                    )
                )
                in_ch = out_ch
        self.final_bn = _batch_norm("final_bn", bn_decay)
        self.fc = hk.Linear(num_classes, w_init=jnp.zeros, name="linear")

    def __call__(
        self, x: jax.Array, is_training: bool, return_features: bool = False
    ) -> jax.Array | dict[str, Any]:
        layers.check_image_batch(x, "BNResNet")
        is_training = is_training or hk.running_init()
        out = self.initial_conv(x)
        out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
        return layers.run_body_and_head(
            self, out, is_training, return_features, lambda h: jax.nn.relu(self.final_bn(h, is_training))
        )
