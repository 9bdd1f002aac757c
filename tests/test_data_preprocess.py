"""Inception crop and evaluation crop geometry (official `dataset.py:_preprocess_image`)."""

import numpy as np
import tensorflow as tf

from nfnets_jax.data import preprocess


def test_inception_crop_windows_obey_the_constraints():
    shape = tf.constant([300, 400, 3])
    areas = []
    for index in range(60):
        window = preprocess.inception_crop_window(shape, tf.constant([index, 7]), 192).numpy()
        top, left, height, width = window
        assert top >= 0 and left >= 0 and top + height <= 300 and left + width <= 400
        if (height, width) == tuple(preprocess.padded_center_crop_window(shape, 192).numpy()[2:]):
            continue  # the fallback
        area = height * width / (300 * 400)
        areas.append(area)
        assert 0.08 - 0.01 <= area <= 1.0
        assert 3 / 4 - 0.05 <= width / height <= 4 / 3 + 0.05
    assert len(areas) > 40 and np.std(areas) > 0.05  # really random, not the fallback


def test_padded_center_crop_window_formula():
    # side = int(S/(S+32) * min(h, w)); offsets ((h - side) + 1) // 2 round up.
    window = preprocess.padded_center_crop_window(tf.constant([375, 500, 3]), 224).numpy()
    side = int(224 / 256 * 375)
    np.testing.assert_array_equal(window, [(375 - side + 1) // 2, (500 - side + 1) // 2,
                                           side, side])


def test_fallback_when_sampling_fails():
    # A 1x40 strip: no window with aspect in [3/4, 4/3] and area >= 8% fits, so TF returns
    # the whole image and the crop falls back to the padded centre crop.
    shape = tf.constant([1, 40, 3])
    window = preprocess.inception_crop_window(shape, tf.constant([0, 0]), 32).numpy()
    np.testing.assert_array_equal(window, preprocess.padded_center_crop_window(shape, 32).numpy())


def test_resize_crop_32_squashes_the_whole_image():
    # 64x128 image, bright exactly where the (S+32)^2 squash + central S crop should look.
    size = 32
    image = np.zeros((64, 128, 3), np.uint8)
    image[16:48, 32:96] = 255
    out = preprocess.eval_preprocess(image, encoded=False, image_size=size,
                                     mode="resize_crop_32").numpy()
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[2:-2, 2:-2], 255.0, atol=1.0)
    assert out.mean() > 240  # an aspect-preserving resize would show the dark sides


def test_crop_resize_keeps_the_aspect_ratio():
    size = 32
    image = np.zeros((64, 128, 3), np.uint8)
    side = int(size / (size + 32) * 64)  # 32 px square at the centre
    top, left = (64 - side + 1) // 2, (128 - side + 1) // 2
    image[top:top + side, left:left + side] = 200
    out = preprocess.eval_preprocess(image, encoded=False, image_size=size,
                                     mode="crop_resize").numpy()
    np.testing.assert_allclose(out, 200.0, atol=1e-3)


def test_train_preprocess_is_unclamped_bicubic_and_seeded():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image)
    first = preprocess.train_preprocess(jpeg, tf.constant([1, 2]), encoded=True, image_size=48)
    again = preprocess.train_preprocess(jpeg, tf.constant([1, 2]), encoded=True, image_size=48)
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    assert first.shape == (48, 48, 3) and first.dtype == tf.float32
    values = np.concatenate([preprocess.train_preprocess(
        tf.constant(image), tf.constant([s, 0]), encoded=False, image_size=48).numpy().ravel()
        for s in range(4)])
    assert values.min() < 0 or values.max() > 255  # bicubic overshoot is kept (noise image)


def test_normalize_uses_imagenet_statistics():
    from nfnets_jax.data.sources import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB
    pixel = np.array([[[0.485 * 255, 0.0, 255.0]]], np.float32)
    out = preprocess.normalize(pixel, IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB).numpy()[0, 0]
    np.testing.assert_allclose(out, [0.0, -0.456 / 0.224, (1 - 0.406) / 0.225], rtol=1e-5)


def test_resize_crop_32_is_the_central_crop_of_the_squash_at_offset_16():
    # `resize_crop_32`: bicubic squash of the whole image to (S+32)^2, then rows/cols [16, 16+S).
    size = 24
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = preprocess.eval_preprocess(image, encoded=False, image_size=size,
                                     mode="resize_crop_32").numpy()
    squashed = tf.image.resize(image.astype(np.float32), (size + 32, size + 32),
                               method="bicubic", antialias=False).numpy()
    np.testing.assert_array_equal(out, squashed[16:16 + size, 16:16 + size])
    assert not np.array_equal(out, squashed[15:15 + size, 15:15 + size])


def _shifted_copies(image, max_shift):
    """Every translation of `image` by at most max_shift px (black fill), and of its mirror."""
    copies = []
    for source in (image, image[:, ::-1]):
        padded = np.pad(source, [(max_shift, max_shift), (max_shift, max_shift), (0, 0)])
        side_y, side_x = image.shape[:2]
        copies += [padded[dy:dy + side_y, dx:dx + side_x]
                   for dy in range(2 * max_shift + 1) for dx in range(2 * max_shift + 1)]
    return copies


def test_pad_crop_flip_is_a_shift_of_the_image_or_of_its_mirror_and_seeded():
    image = np.random.default_rng(0).integers(1, 256, size=(12, 12, 3)).astype(np.uint8)
    outputs = [preprocess.pad_crop_flip(tf.constant(image), tf.constant([index, 3]), encoded=False,
                                        image_size=12, max_shift=2).numpy() for index in range(40)]
    copies = _shifted_copies(image.astype(np.float32), 2)
    for output in outputs:
        assert output.dtype == np.float32 and output.shape == (12, 12, 3)
        assert any(np.array_equal(output, copy) for copy in copies)
    mirrored = [any(np.array_equal(out, copy) for copy in copies[25:]) for out in outputs]
    assert 5 < sum(mirrored) < 35  # flipped with probability 1/2
    again = preprocess.pad_crop_flip(tf.constant(image), tf.constant([7, 3]), encoded=False,
                                     image_size=12, max_shift=2).numpy()
    np.testing.assert_array_equal(again, outputs[7])


def test_pad_crop_flip_resizes_to_another_image_size():
    image = np.full((8, 8, 3), 100, np.uint8)
    out = preprocess.pad_crop_flip(tf.constant(image), tf.constant([0, 0]), encoded=False,
                                   image_size=16, max_shift=0).numpy()
    np.testing.assert_allclose(out, np.full((16, 16, 3), 100.0), atol=1e-3)  # a flat image stays flat


def test_eval_resize_serves_the_whole_image_at_the_new_size():
    # Left half dark, right half bright: resizing keeps the halves where they were (no crop).
    image = np.zeros((28, 28, 3), np.uint8)
    image[:, 14:] = 200
    out = preprocess.eval_preprocess(tf.constant(image), encoded=False, image_size=56,
                                     mode="resize").numpy()
    assert out.shape == (56, 56, 3)
    np.testing.assert_allclose(out[:, :24], 0.0, atol=1e-3)
    np.testing.assert_allclose(out[:, 32:], 200.0, atol=1e-3)
