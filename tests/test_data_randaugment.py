"""RandAugment (docs/randaugment.md): the magnitude table and each op against NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from nfnets_jax.data import randaugment


def _image(height=12, width=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("magnitude, table", [
    # (rotate deg, shear, translate px, cutout half-size, posterize bits, solarize threshold,
    #  solarize-add, enhance factor): docs/randaugment.md columns M = 5, 10, 15.
    (5, (15, 0.15, 50, 20, 2, 128, 55, 1.0)),
    (10, (30, 0.3, 100, 40, 4, 256, 110, 1.9)),
    (15, (45, 0.45, 150, 60, 6, 384, 165, 2.8)),
])
def test_magnitude_table(magnitude, table):
    rotate, shear, translate, cutout, bits, threshold, add, enhance = table
    args = randaugment.op_arguments(magnitude)
    assert args["Rotate"] == pytest.approx(rotate)
    assert args["ShearX"] == args["ShearY"] == pytest.approx(shear)
    assert args["TranslateX"] == args["TranslateY"] == pytest.approx(translate)
    assert args["Cutout"] == cutout  # half-size: 40x40, 80x80, 120x120 squares
    assert args["Posterize"] == bits
    assert args["Solarize"] == threshold
    assert args["SolarizeAdd"] == add
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert args[name] == pytest.approx(enhance)
    assert len(randaugment.OP_NAMES) == 16 and len(args) == 16


def test_posterize_keeps_the_table_bits():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    for magnitude, bits in ((5, 2), (10, 4), (15, 6)):
        out = randaugment.apply_op(image, "Posterize", magnitude, 1.0, tf.constant([0, 0])).numpy()
        mask = (0xFF << (8 - bits)) & 0xFF
        np.testing.assert_array_equal(out, image & mask)


def test_rotation_angles_follow_the_table():
    # A single bright pixel to the right of the centre of a 21x21 image moves on the circle.
    image = np.zeros((21, 21, 3), np.uint8)
    image[10, 18] = 255
    for magnitude, degrees in ((5, 15.0), (10, 30.0), (15, 45.0)):
        for sign in (1.0, -1.0):
            out = randaugment.apply_op(image, "Rotate", magnitude, sign, tf.constant([0, 0]))
            rows, cols = np.nonzero(out.numpy()[..., 0] == 255)
            angle = np.degrees(np.arctan2(-(rows.mean() - 10), cols.mean() - 10))
            # Counter-clockwise as displayed for a positive angle (rows grow downwards).
            assert angle == pytest.approx(sign * degrees, abs=4.0)


def test_rotate_90_is_numpy_rot90_with_grey_fill():
    image = _image(9, 9)
    out = randaugment.rotate(image, 90.0).numpy()
    np.testing.assert_array_equal(out, np.rot90(image, k=1, axes=(0, 1)))
    wide = _image(6, 10)
    corner = randaugment.rotate(wide, 90.0).numpy()
    assert (corner[0, 0] == randaugment.FILL_VALUE).all()  # outside the rotated image


def test_translate_and_shear_against_numpy():
    # Official translate_x(pixels) = tfa translate by [dx, dy] = [-pixels, 0]: content moves left.
    image = _image(10, 14)
    out = randaugment.translate_x(image, 3.0).numpy()
    expected = np.full_like(image, 128)
    expected[:, :-3] = image[:, 3:]
    np.testing.assert_array_equal(out, expected)
    out = randaugment.translate_y(image, -4.0).numpy()  # negative: content moves down
    expected = np.full_like(image, 128)
    expected[4:] = image[:-4]
    np.testing.assert_array_equal(out, expected)
    # ShearX: output (x, y) samples input x + level*y (nearest).
    level = 0.5
    out = randaugment.shear_x(image, level).numpy()
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            source_x = int(np.floor(x + level * y + 0.5))
            want = image[y, source_x] if source_x < image.shape[1] else [128] * 3
            np.testing.assert_array_equal(out[y, x], want)


def test_colour_ops_against_numpy():
    image = _image(8, 8, seed=1)
    values = image.astype(np.int32)
    np.testing.assert_array_equal(randaugment.invert(image).numpy(), 255 - image)
    np.testing.assert_array_equal(randaugment.solarize(image, 128).numpy(),
                                  np.where(values < 128, values, 255 - values))
    np.testing.assert_array_equal(randaugment.solarize_add(image, 55).numpy(),
                                  np.where(values < 128, np.minimum(values + 55, 255), values))
    # Brightness blends with black: truncation of factor * x, clipped.
    np.testing.assert_array_equal(randaugment.brightness(image, 1.9).numpy(),
                                  np.clip(1.9 * values.astype(np.float32), 0, 255).astype(np.uint8))
    # At M = 5 every enhance op is the identity (factor exactly 1.0).
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        out = randaugment.apply_op(image, name, 5, 1.0, tf.constant([0, 0])).numpy()
        np.testing.assert_array_equal(out, image)


def test_solarize_threshold_wraps_like_the_official_uint8_comparison():
    # Regression: thresholds 256 (M = 10) and 384 (M = 15) are not no-ops. The official
    # `tf.where(image < threshold, image, 255 - image)` compares a uint8 image with the Python
    # int converted to uint8: 256 -> 0 (invert everything), 384 -> 128.
    image = _image(8, 8, seed=7)
    values = image.astype(np.int32)
    for threshold, wrapped in ((128, 128), (256, 0), (384, 128)):
        expected = np.where(values < wrapped, values, 255 - values).astype(np.uint8)
        np.testing.assert_array_equal(randaugment.solarize(image, threshold).numpy(), expected)
        as_tensor = tf.constant(image)
        official = tf.where(as_tensor < threshold, as_tensor, 255 - as_tensor).numpy()
        np.testing.assert_array_equal(official, expected)  # TF itself still wraps
    out = randaugment.apply_op(image, "Solarize", 10, 1.0, tf.constant([0, 0])).numpy()
    np.testing.assert_array_equal(out, 255 - image)  # at M = 10 Solarize is Invert


def test_posterize_shifts_uint8_like_the_official_op():
    # Regression: TF clamps uint8 shifts to 7, so bits = 0 (M < 2.5) and bits > 8 (M >= 22.5,
    # shift -1 wraps to 255) keep the top bit instead of zeroing the image or keeping it all.
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    for magnitude, mask in ((0, 0x80), (2, 0x80), (20, 0xFF), (25, 0x80)):
        out = randaugment.apply_op(image, "Posterize", magnitude, 1.0, tf.constant([0, 0]))
        np.testing.assert_array_equal(out.numpy(), image & mask)


def test_contrast_blends_with_pixel_count_over_256():
    image = _image(16, 16, seed=2)  # 256 px -> level 1.0, not the mean grey level
    out = randaugment.contrast(image, 1.9).numpy()
    expected = np.clip(1.0 + 1.9 * (image.astype(np.float32) - 1.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_autocontrast_and_equalize_against_numpy():
    image = (_image(8, 8, seed=3) // 4 + 40).astype(np.uint8)  # values in [40, 103]
    out = randaugment.autocontrast(image).numpy()
    for c in range(3):
        channel = image[..., c].astype(np.float32)
        low, high = channel.min(), channel.max()
        scale = 255.0 / (high - low)
        expected = np.clip(channel * scale - low * scale, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(out[..., c], expected)
    flat = np.full((4, 4, 3), 7, np.uint8)
    np.testing.assert_array_equal(randaugment.autocontrast(flat).numpy(), flat)
    np.testing.assert_array_equal(randaugment.equalize(flat).numpy(), flat)  # step 0: unchanged

    image = (_image(40, 40, seed=6) // 2).astype(np.uint8)  # 1600 px: the histogram step is > 0
    out = randaugment.equalize(image).numpy()
    for c in range(3):  # PIL ImageOps.equalize, re-derived
        channel = image[..., c]
        histogram = np.bincount(channel.ravel(), minlength=256)
        nonzero = histogram[histogram > 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        assert step > 0
        lut = np.concatenate([[0], (np.cumsum(histogram) + step // 2) // step])[:256]
        np.testing.assert_array_equal(out[..., c], np.clip(lut, 0, 255)[channel])


def test_cutout_greys_a_square_of_the_table_size():
    image = np.zeros((200, 200, 3), np.uint8)
    out = randaugment.apply_op(image, "Cutout", 5, 1.0, tf.constant([3, 4])).numpy()
    rows, cols = np.nonzero(out[..., 0] == 128)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert height <= 40 and width <= 40  # 2 * int(0.5 * 40), clipped at the border
    assert len(rows) == height * width  # one solid rectangle


def test_sharpness_keeps_borders_and_smooths_interior():
    image = _image(6, 6, seed=4)
    out = randaugment.sharpness(image, 0.0).numpy()  # factor 0: the degenerate image itself
    np.testing.assert_array_equal(out[0], image[0])
    np.testing.assert_array_equal(out[:, -1], image[:, -1])
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    window = image[1:4, 1:4, 0].astype(np.float32)
    assert out[2, 2, 0] == np.uint8(np.clip((window * kernel).sum(), 0, 255))


def test_randaugment_is_a_function_of_its_seed():
    image = _image(24, 24, seed=5)
    first = randaugment.randaugment(image, tf.constant([1, 2]), 4, 15).numpy()
    again = randaugment.randaugment(image, tf.constant([1, 2]), 4, 15).numpy()
    other = [randaugment.randaugment(image, tf.constant([1, s]), 4, 15).numpy()
             for s in range(3, 8)]
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.uint8 and first.shape == image.shape
    assert any(not np.array_equal(first, o) for o in other)
    with pytest.raises(TypeError, match="uint8"):
        randaugment.randaugment(image.astype(np.float32), tf.constant([1, 2]), 1, 5)
