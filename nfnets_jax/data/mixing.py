"""MixUp and CutMix, arranged as in the official NFNet pipeline (official
`deepmind-research/nfnets/dataset.py:my_mixup_cutmix`).

`mixup_cutmix` takes 2B examples and returns B, every one of them mixed (b = B/2):
outputs 0..b−1 are MixUp of the pairs (i, b+i) with λ ~ Beta(0.2, 0.2); outputs b..2b−1 are
CutMix of (2b+i, 3b+i), the first image inside the box, with ratio = box area fraction. The
returned `labels` are each pair's first image, `mix_labels` the second, and the loss builds
targets ratio·onehot(labels) + (1 − ratio)·onehot(mix_labels). Randomness is stateless.
"""

from __future__ import annotations

from nfnets_jax.runtime.program_output import import_tensorflow

import_tensorflow()  # TensorFlow's C++ start-up notices held back (runtime/program_output.py)
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

INPUTS_PER_OUTPUT = {"mixup_cutmix": 2, "mixup": 2, "cutmix": 2, "none": 1}


def sample_beta(seed: tf.Tensor, alpha: float, shape) -> tf.Tensor:
    """Beta(α, α) as X/(X+Y) of two stateless Gamma(α) draws (0.5 if both underflow to 0)."""
    seed_x, seed_y = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x = tf.random.stateless_gamma(shape, seed_x, alpha=alpha)
    y = tf.random.stateless_gamma(shape, seed_y, alpha=alpha)
    total = x + y
    return tf.where(total > 0, x / tf.where(total > 0, total, 1.0), 0.5)


def cutmix_masks(seed: tf.Tensor, count: int, height: int, width: int) -> tf.Tensor:
    """`count` float32 [H, W, 1] box masks: 1 inside, 0 outside (official `dataset.py:cutmix_padding`).

    Per mask: centre uniform over the image, u ~ U(0, 1), box sides int(√(1−u)·W) by
    int(√(1−u)·H) with half-extents side//2, clipped to the image; so the area fraction is
    about Beta(1, 1), as in the CutMix paper.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    center_y = tf.random.stateless_uniform([count], seeds[0], 0, height, dtype=tf.int32)
    center_x = tf.random.stateless_uniform([count], seeds[1], 0, width, dtype=tf.int32)
    keep = tf.sqrt(1.0 - tf.random.stateless_uniform([count], seeds[2]))
    half_h = tf.cast(keep * height, tf.int32) // 2
    half_w = tf.cast(keep * width, tf.int32) // 2
    top = tf.maximum(center_y - half_h, 0)[:, None, None]
    bottom = tf.minimum(center_y + half_h, height)[:, None, None]
    left = tf.maximum(center_x - half_w, 0)[:, None, None]
    right = tf.minimum(center_x + half_w, width)[:, None, None]
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return tf.cast(inside, tf.float32)[..., None]


def _mixup(first, second, seed, alpha):
    ratio = sample_beta(seed, alpha, [tf.shape(first["image"])[0]])
    images = (ratio[:, None, None, None] * first["image"]
              + (1.0 - ratio[:, None, None, None]) * second["image"])
    return images, ratio


def _cutmix(first, second, seed):
    count, height, width = first["image"].shape[:3]
    masks = cutmix_masks(seed, count, height, width)
    images = masks * first["image"] + (1.0 - masks) * second["image"]
    return images, tf.reduce_mean(masks, axis=[1, 2, 3])


def _pair_output(first, second, images, ratio):
    return {"images": images, "labels": first["label"], "mix_labels": second["label"],
            "ratio": ratio}


def mix_batch(batch: dict, seed: tf.Tensor, mode: str, alpha: float = 0.2) -> dict:
    """Mixes one per-device group of examples: 2B float images in, B out (B in, B out for 'none').

    Args:
      batch: {'image': float32 [n, H, W, 3] with static shape, 'label': int32 [n]}.
      seed: stateless seed [2].
      mode: 'mixup_cutmix' | 'mixup' | 'cutmix' | 'none'.
      alpha: MixUp's Beta(α, α) parameter.
    Returns:
      {'images', 'labels', 'mix_labels', 'ratio'}; ratio is the weight of `labels`.
    """
    count = batch["image"].shape[0]
    if mode == "none":
        return {"images": batch["image"], "labels": batch["label"],
                "mix_labels": batch["label"], "ratio": tf.ones([count], tf.float32)}
    if mode not in INPUTS_PER_OUTPUT:
        raise ValueError(f"Unknown mix mode {mode!r}; use one of {tuple(INPUTS_PER_OUTPUT)}.")
    half = count // 2
    take = lambda start, size: {key: value[start:start + size] for key, value in batch.items()}
    if mode == "mixup":
        first, second = take(0, half), take(half, half)
        return _pair_output(first, second, *_mixup(first, second, seed, alpha))
    if mode == "cutmix":
        first, second = take(0, half), take(half, half)
        return _pair_output(first, second, *_cutmix(first, second, seed))
    if count % 4:
        raise ValueError(f"mixup_cutmix needs a multiple of 4 inputs (2 x an even per-device "
                         f"batch), got {count}.")
    quarter = count // 4
    mixup_seed, cutmix_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    first, second = take(0, quarter), take(quarter, quarter)
    mixup = _pair_output(first, second, *_mixup(first, second, mixup_seed, alpha))
    first, second = take(2 * quarter, quarter), take(3 * quarter, quarter)
    cutmix = _pair_output(first, second, *_cutmix(first, second, cutmix_seed))
    return {key: tf.concat([mixup[key], cutmix[key]], axis=0) for key in mixup}
