"""MixUp/CutMix arrangement and weights (official `dataset.py:my_mixup_cutmix`)."""

import numpy as np
import pytest
import tensorflow as tf

from nfnets_jax.data import mixing


def _batch(count, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": tf.constant(rng.uniform(0, 255, (count, size, size, 3)).astype(np.float32)),
            "label": tf.constant(np.arange(count, dtype=np.int32) + 100)}


def test_mixup_cutmix_arrangement_weights_and_box_area():
    count, half = 16, 4  # 2B = 16 inputs -> B = 8 outputs, b = 4
    batch = _batch(count)
    images = batch["image"].numpy()
    out = {k: v.numpy() for k, v in mixing.mix_batch(batch, tf.constant([3, 4]),
                                                     "mixup_cutmix", 0.2).items()}
    assert out["images"].shape == (8, 16, 16, 3)
    assert np.all((out["ratio"] >= 0) & (out["ratio"] <= 1))
    labels = batch["label"].numpy()
    # MixUp of pairs (i, b+i); labels are the first image of the pair.
    np.testing.assert_array_equal(out["labels"][:half], labels[:half])
    np.testing.assert_array_equal(out["mix_labels"][:half], labels[half:2 * half])
    for i in range(half):
        lam = out["ratio"][i]
        np.testing.assert_allclose(out["images"][i],
                                   lam * images[i] + (1 - lam) * images[half + i], atol=1e-3)
    # CutMix of (2b+i, 3b+i): the first image inside one box, ratio = box area fraction.
    np.testing.assert_array_equal(out["labels"][half:], labels[2 * half:3 * half])
    np.testing.assert_array_equal(out["mix_labels"][half:], labels[3 * half:])
    for i in range(half):
        mixed, first, second = out["images"][half + i], images[2 * half + i], images[3 * half + i]
        from_first = np.all(np.isclose(mixed, first), axis=-1)
        assert np.all(from_first | np.all(np.isclose(mixed, second), axis=-1))
        rows, cols = np.nonzero(from_first)
        if len(rows):  # a solid rectangle
            assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        assert out["ratio"][half + i] == pytest.approx(from_first.mean())


def test_mixup_ratio_follows_beta_02():
    ratios = mixing.sample_beta(tf.constant([0, 1]), 0.2, [20000]).numpy()
    assert np.all((ratios >= 0) & (ratios <= 1))
    # Beta(0.2, 0.2): mean 1/2, variance ab/((a+b)^2 (a+b+1)) = 0.04/(0.16*1.4) = 0.17857.
    assert ratios.mean() == pytest.approx(0.5, abs=0.01)
    assert ratios.var() == pytest.approx(0.04 / (0.16 * 1.4), abs=0.01)


def test_cutmix_box_sides_follow_sqrt_one_minus_u():
    # With the centre far from the borders the box is int(sqrt(1-u)*S) // 2 * 2 on each side;
    # the unclipped area fraction is then ~Beta(1, 1): mean 1/2 (minus the rounding).
    masks = mixing.cutmix_masks(tf.constant([5, 6]), 4000, 64, 64).numpy()[..., 0]
    fractions = masks.mean(axis=(1, 2))
    assert np.all((fractions >= 0) & (fractions <= 1))
    for mask in masks[:200]:
        rows, cols = np.nonzero(mask)
        if len(rows):
            assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    assert 0.25 < fractions.mean() < 0.5  # clipping at the borders only removes area


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_single_mixing_pairs_i_with_b_plus_i(mode):
    batch = _batch(8)
    out = mixing.mix_batch(batch, tf.constant([1, 1]), mode, 0.2)
    np.testing.assert_array_equal(out["labels"].numpy(), batch["label"].numpy()[:4])
    np.testing.assert_array_equal(out["mix_labels"].numpy(), batch["label"].numpy()[4:])
    assert out["images"].shape == (4, 16, 16, 3)


def test_none_passes_through_with_ratio_one():
    batch = _batch(4)
    out = mixing.mix_batch(batch, tf.constant([1, 1]), "none")
    np.testing.assert_array_equal(out["images"].numpy(), batch["image"].numpy())
    np.testing.assert_array_equal(out["ratio"].numpy(), np.ones(4, np.float32))
    np.testing.assert_array_equal(out["mix_labels"].numpy(), batch["label"].numpy())


def test_cutmix_box_geometry_on_a_non_square_image():
    # official `cutmix_padding`: one u per mask, sides int(sqrt(1-u)*H) by int(sqrt(1-u)*W) with
    # half-extents side//2 around the centre, clipped. For boxes clear of the borders both
    # sides are even and a single keep = sqrt(1-u) must explain both (H and W not swapped).
    height, width = 24, 60
    masks = mixing.cutmix_masks(tf.constant([2, 9]), 400, height, width).numpy()[..., 0]
    interior = 0
    for mask in masks:
        rows, cols = np.nonzero(mask)
        if not len(rows):
            continue
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert mask.sum() == (bottom - top) * (right - left)  # one solid box
        if top == 0 or left == 0 or bottom == height or right == width:
            continue
        interior += 1
        side_h, side_w = bottom - top, right - left
        assert side_h % 2 == 0 and side_w % 2 == 0
        # int(k*H) is side_h or side_h + 1, so k*H lies in [side_h, side_h + 2); same for W.
        low = max(side_h / height, side_w / width)
        high = min((side_h + 2) / height, (side_w + 2) / width)
        assert low < high, (side_h, side_w)
    assert interior > 50
