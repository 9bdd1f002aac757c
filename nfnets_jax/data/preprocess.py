"""Per-example preprocessing: the Inception crop for training, squash-and-crop for evaluation.

Exactly the official NFNet recipe (official `dataset.py:_preprocess_image`): a distorted
bounding-box crop (area 0.08-1, aspect 3/4-4/3, min object 0.1, 10 attempts) fused with JPEG
decoding, with a padded centre crop as fallback; a horizontal flip; a bicubic resize that is
neither antialiased nor clamped. Evaluation squashes the whole image to (S+32)² and takes the
central S². All randomness is stateless, keyed by the caller's seed, so an example's
augmentation never depends on how many examples were processed before it (exact resume).
"""

from __future__ import annotations

from nfnets_jax.runtime.program_output import import_tensorflow

import_tensorflow()  # TensorFlow's C++ start-up notices held back (runtime/program_output.py)
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

CROP_PADDING = 32  # the "32" of resize_crop_32 and of the padded centre crop
MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
AREA_RANGE = (0.08, 1.0)
MAX_ATTEMPTS = 10


def image_shape(image: tf.Tensor, encoded: bool) -> tf.Tensor:
    """[height, width, channels] of JPEG bytes (header only) or of a decoded array."""
    return tf.io.extract_jpeg_shape(image) if encoded else tf.shape(image)


def crop(image: tf.Tensor, encoded: bool, window: tf.Tensor) -> tf.Tensor:
    """Crops `window` = [offset_y, offset_x, height, width]; decodes JPEG bytes while cropping.

    For JPEG bytes the decode and the crop are one fused op, so only the window is decoded
    (as the official `dataset.py` does).
    """
    if encoded:
        return tf.io.decode_and_crop_jpeg(image, window, channels=3)
    return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])


def decode(image: tf.Tensor, encoded: bool) -> tf.Tensor:
    """The whole image as uint8 [H, W, 3]."""
    return tf.io.decode_jpeg(image, channels=3) if encoded else image


def padded_center_crop_window(shape: tf.Tensor, image_size: int) -> tf.Tensor:
    """Aspect-preserving centre crop of side S/(S+32)·min(h, w); offsets round up (official
    `dataset.py:_decode_and_center_crop`)."""
    height, width = shape[0], shape[1]
    scale = image_size / (image_size + CROP_PADDING)
    side = tf.cast(scale * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    offset_y = (height - side + 1) // 2
    offset_x = (width - side + 1) // 2
    return tf.stack([offset_y, offset_x, side, side])


def inception_crop_window(shape: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """The Inception distorted-bounding-box window, or the padded centre crop if sampling failed.

    `sample_distorted_bounding_box` returns the whole image when none of its 10 attempts meets
    the constraints; the official code then falls back to the centre crop (`_decode_and_random_crop`).
    """
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=whole_image, seed=seed,
        min_object_covered=MIN_OBJECT_COVERED, aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE, max_attempts=MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    sampling_failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
    return tf.cond(sampling_failed, lambda: padded_center_crop_window(shape, image_size),
                   lambda: window)


def resize_bicubic(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Bicubic resize to float32, no antialiasing, no clamping: values may leave [0, 255]."""
    return tf.image.resize(tf.cast(image, tf.float32), (height, width), method="bicubic")


def train_preprocess(image: tf.Tensor, seed: tf.Tensor, *, encoded: bool,
                     image_size: int) -> tf.Tensor:
    """Inception crop (fused decode) -> random flip -> bicubic resize; float32 [S, S, 3].

    Official order (`dataset.py:_preprocess_image`): the flip acts on the crop, before resizing.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = inception_crop_window(image_shape(image, encoded), crop_seed, image_size)
    cropped = crop(image, encoded, window)
    flipped = tf.image.stateless_random_flip_left_right(cropped, flip_seed)
    return resize_bicubic(flipped, image_size, image_size)


def random_shift(image: tf.Tensor, seed: tf.Tensor, max_shift: int) -> tf.Tensor:
    """Translates by up to `max_shift` px in each direction, filling with black; float32.

    The light augmentation for digits: no flips (a flipped 2 is not a 2) and no crops.
    """
    image = tf.cast(image, tf.float32)
    if max_shift <= 0:
        return image
    height, width = image.shape[0], image.shape[1]
    padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    offsets = tf.random.stateless_uniform([2], seed, 0, 2 * max_shift + 1, dtype=tf.int32)
    return tf.image.crop_to_bounding_box(padded, offsets[0], offsets[1], height, width)


def pad_crop_flip(image: tf.Tensor, seed: tf.Tensor, *, encoded: bool, image_size: int,
                  max_shift: int) -> tf.Tensor:
    """Shift by up to `max_shift` px (black padding, random crop of the original size), flip
    left-right with probability 1/2, resize to `image_size` if the image has another size; float32.

    The usual augmentation of small fixed-size images (CIFAR, Fashion-MNIST: pad 4, crop, flip),
    where an Inception crop would keep too few pixels to recognise. The images' size must be
    known when the pipeline is built (TFDS features of fixed shape).
    """
    shift_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shifted = random_shift(decode(image, encoded), shift_seed, max_shift)
    flipped = tf.image.stateless_random_flip_left_right(shifted, flip_seed)
    if flipped.shape[0] == image_size and flipped.shape[1] == image_size:
        return flipped
    return resize_bicubic(flipped, image_size, image_size)


def eval_preprocess(image: tf.Tensor, *, encoded: bool, image_size: int,
                    mode: str) -> tf.Tensor:
    """Evaluation preprocessing; float32 [S, S, 3].

    'resize_crop_32' (NFNets): squash the whole image to (S+32)² (aspect ratio NOT kept), then
    take the central S² at offset 16. 'crop_resize' (ResNets): padded centre crop, then resize
    to S. 'resize': the whole image resized to S² (small images served larger, as
    `pad_crop_flip` trains them). 'none': the image as it is, which must already be S×S.
    """
    if mode == "resize_crop_32":
        resized = resize_bicubic(decode(image, encoded), image_size + CROP_PADDING,
                                 image_size + CROP_PADDING)
        offset = CROP_PADDING // 2
        return resized[offset:offset + image_size, offset:offset + image_size, :]
    if mode == "crop_resize":
        window = padded_center_crop_window(image_shape(image, encoded), image_size)
        return resize_bicubic(crop(image, encoded, window), image_size, image_size)
    if mode == "resize":
        return resize_bicubic(decode(image, encoded), image_size, image_size)
    if mode == "none":
        decoded = tf.cast(decode(image, encoded), tf.float32)
        return tf.ensure_shape(decoded, (image_size, image_size, 3))
    raise ValueError(f"Unknown eval preprocessing {mode!r}; use 'resize_crop_32', "
                     "'crop_resize', 'resize' or 'none'.")


def normalize(image: tf.Tensor, mean_rgb, stddev_rgb) -> tf.Tensor:
    """(x − mean)/std with statistics in [0, 255] units (ImageNet: 255·(0.485, 0.456, 0.406))."""
    mean = tf.constant(mean_rgb, tf.float32)
    stddev = tf.constant(stddev_rgb, tf.float32)
    return (tf.cast(image, tf.float32) - mean) / stddev
