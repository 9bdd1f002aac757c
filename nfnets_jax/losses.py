"""Classification loss: softmax cross-entropy on soft (mixed) labels with label smoothing.

The NFNet recipe (paper App. A.1; official `dataset.py:my_mixup_cutmix`) mixes labels first,
y = r · onehot(label) + (1 − r) · onehot(mix_label) for MixUp/CutMix ratio r, then smooths
them, y ← (1 − s) · y + s / C with s = 0.1, and takes the cross-entropy against float32
logits (the forward pass may run in bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example −Σ_c ỹ_c · log softmax(logits)_c with ỹ = (1 − s) · y + s / C.

    Args:
      logits: `[B, C]`, any float dtype; cast to float32 before the softmax.
      targets: `[B, C]` soft labels, each row summing to 1 (e.g. from `mixed_targets`).
      label_smoothing: s in [0, 1).

    Returns:
      float32 loss per example, `[B]`; the caller takes the (masked) mean.
    """
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {logits.shape} and targets {targets.shape} must have the same [batch, classes] "
            "shape; turn integer labels into soft targets with mixed_targets or jax.nn.one_hot."
        )
    smoothed = optax.smooth_labels(targets.astype(jnp.float32), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), smoothed)


def mixed_targets(labels: jax.Array, mix_labels: jax.Array, ratio: jax.Array, num_classes: int) -> jax.Array:
    """Soft targets of MixUp/CutMix: ratio · onehot(labels) + (1 − ratio) · onehot(mix_labels).

    `ratio` is 1 for unmixed examples, so their target is the plain one-hot; `[B, C]` float32.
    """
    ratio = jnp.asarray(ratio, jnp.float32)[..., None]
    first = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    second = jax.nn.one_hot(mix_labels, num_classes, dtype=jnp.float32)
    return ratio * first + (1.0 - ratio) * second
