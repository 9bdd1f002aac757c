"""RandAugment exactly as the official NFNet pipeline runs it (docs/randaugment.md; official
`deepmind-research/nfnets/autoaugment.py:distort_image_with_randaugment`).

N layers; each picks one of 16 ops uniformly and always applies it, at a fixed magnitude M
mapped to op arguments by the table in docs/randaugment.md, including the quirks of the TF TPU
code it came from: posterize keeps int(M/10·4) bits (stronger at low M), the enhance ops are identities at
M = 5, translation is in absolute pixels, and Contrast blends with (pixel count / 256) instead of
the mean grey level. Images are uint8 [H, W, 3].

Solarize's threshold int(M/10·256) is compared with the uint8 image, so TF converts it to uint8
first and it wraps modulo 256: at M = 10 the threshold 256 becomes 0 and Solarize inverts every
pixel (it is Invert), at M = 15 the threshold 384 becomes 128. Reading these thresholds as
no-ops is tempting, but that is not what the official expression `tf.where(image <
threshold, image, 255 - image)` computes (measured here with TF 2.21, eagerly, in tf.function
and in tf.data). Posterize likewise shifts uint8 values, where TF clamps shifts to [0, 7].

Geometric ops use TF's raw projective-transform op (no tensorflow-addons, which reached end
of life) with nearest-neighbour sampling and grey (128) fill. All randomness is stateless.
"""

from __future__ import annotations

import math

from nfnets_jax.runtime.program_output import import_tensorflow

import_tensorflow()  # TensorFlow's C++ start-up notices held back (runtime/program_output.py)
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

FILL_VALUE = 128  # grey fill for geometric ops and Cutout
TRANSLATE_CONST = 100  # px at M = 10
CUTOUT_CONST = 40  # half-size in px at M = 10
MAX_LEVEL = 10.0

OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
            "TranslateY", "Cutout", "SolarizeAdd")
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def op_arguments(magnitude: float) -> dict[str, float | int | None]:
    """The argument of every op at magnitude M, before the random sign (docs/randaugment.md)."""
    level = magnitude / MAX_LEVEL
    enhance = level * 1.8 + 0.1
    return {
        "AutoContrast": None, "Equalize": None, "Invert": None,
        "Rotate": level * 30.0,  # degrees
        "Posterize": int(level * 4),  # bits kept
        "Solarize": int(level * 256),  # threshold
        "Color": enhance, "Contrast": enhance, "Brightness": enhance, "Sharpness": enhance,
        "ShearX": level * 0.3, "ShearY": level * 0.3,
        "TranslateX": level * TRANSLATE_CONST, "TranslateY": level * TRANSLATE_CONST,  # px
        "Cutout": int(level * CUTOUT_CONST),  # half-size in px
        "SolarizeAdd": int(level * 110),  # added below 128
    }


# --------------------------------------------------------------------------------------------
# Colour ops.


def invert(image: tf.Tensor) -> tf.Tensor:
    return 255 - tf.convert_to_tensor(image)


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
    """Keeps the `bits` most significant bits of every channel value (uint8 shifts, as official).

    The shift 8 − bits is converted to uint8 (wrapping mod 256) and TF clamps shifts to at most
    7: bits = 0 (M < 2.5) keeps 1 bit, not 0; bits = 8 changes nothing; bits > 8 (M >= 22.5)
    gives a negative shift that wraps to 255, clamped to 7: 1 bit again.
    """
    shift = (8 - int(bits)) % 256
    image = tf.convert_to_tensor(image, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
    """Inverts values at or above `threshold` mod 256 (the official uint8 comparison).

    The official `image < threshold` converts the Python int to uint8, which wraps: 256 -> 0
    (every value is inverted), 384 -> 128. See the module docstring.
    """
    as_int = tf.cast(image, tf.int32)
    wrapped = int(threshold) % 256
    return tf.cast(tf.where(as_int < wrapped, as_int, 255 - as_int), tf.uint8)


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128) -> tf.Tensor:
    """Adds `addition` (clipped to 255) to values below `threshold`."""
    as_int = tf.cast(image, tf.int32)
    added = tf.clip_by_value(as_int + addition, 0, 255)
    return tf.cast(tf.where(as_int < threshold, added, as_int), tf.uint8)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: float) -> tf.Tensor:
    """degenerate + factor·(image − degenerate), clipped to [0, 255] and truncated to uint8.

    factor 1 returns the image and factor 0 the degenerate image unchanged.
    """
    if factor == 1.0:
        return image
    if factor == 0.0:
        return degenerate
    low = tf.cast(degenerate, tf.float32)
    mixed = low + factor * (tf.cast(image, tf.float32) - low)
    return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def color(image: tf.Tensor, factor: float) -> tf.Tensor:
    """Blends with the grey-level image (saturation)."""
    grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
    return blend(grey, image, factor)


def contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
    """Blends with a flat image of level min(pixel count / 256, 255) (the official quirk)."""
    grey = tf.image.rgb_to_grayscale(image)
    histogram = tf.histogram_fixed_width(tf.cast(grey, tf.int32), [0, 255], nbins=256)
    level = tf.reduce_sum(tf.cast(histogram, tf.float32)) / 256.0
    flat = tf.cast(tf.clip_by_value(tf.ones_like(grey, tf.float32) * level, 0.0, 255.0), tf.uint8)
    return blend(tf.image.grayscale_to_rgb(flat), image, factor)


def brightness(image: tf.Tensor, factor: float) -> tf.Tensor:
    """Blends with black."""
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
    """Blends with a 3x3 smoothed image ([[1,1,1],[1,5,1],[1,1,1]]/13); borders stay original."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smoothed = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel,
                                      strides=[1, 1, 1, 1], padding="VALID")[0]
    smoothed = tf.cast(tf.clip_by_value(smoothed, 0.0, 255.0), tf.uint8)
    interior = tf.pad(tf.ones_like(smoothed, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(smoothed, [[1, 1], [1, 1], [0, 0]]), image)
    return blend(degenerate, image, factor)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Stretches each channel linearly so its min maps to 0 and its max to 255."""
    def stretch(channel):
        values = tf.cast(channel, tf.float32)
        low, high = tf.reduce_min(values), tf.reduce_max(values)
        scale = 255.0 / tf.maximum(high - low, 1.0)
        offset = -low * scale
        stretched = tf.cast(tf.clip_by_value(values * scale + offset, 0.0, 255.0), tf.uint8)
        return tf.where(high > low, stretched, channel)
    return tf.stack([stretch(image[..., c]) for c in range(3)], axis=-1)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """Per-channel histogram equalisation (PIL's ImageOps.equalize algorithm)."""
    def equalize_channel(channel):
        values = tf.cast(channel, tf.int32)
        histogram = tf.histogram_fixed_width(values, [0, 255], nbins=256)
        nonzero = tf.boolean_mask(histogram, histogram != 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

        def remap():
            lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
            lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
            return tf.cast(tf.gather(lut, values), tf.uint8)

        return tf.cond(step == 0, lambda: channel, remap)
    return tf.stack([equalize_channel(image[..., c]) for c in range(3)], axis=-1)


# --------------------------------------------------------------------------------------------
# Geometric ops: output pixel (x, y) samples input pixel ((a0·x + a1·y + a2), (b0·x + b1·y + b2)).


def projective_transform(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
    """Applies the 8-parameter output->input map with nearest sampling and grey fill."""
    shape = tf.shape(image)
    transformed = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.cast(tf.reshape(transform, [1, 8]), tf.float32),
        output_shape=shape[:2], fill_value=tf.constant(FILL_VALUE, tf.float32),
        interpolation="NEAREST", fill_mode="CONSTANT")
    return tf.reshape(transformed[0], shape)


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
    """Rotates counter-clockwise (as displayed) by `degrees` about the image centre."""
    radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    shape = tf.cast(tf.shape(image), tf.float32)
    center_x, center_y = (shape[1] - 1.0) / 2.0, (shape[0] - 1.0) / 2.0
    return projective_transform(image, tf.stack([
        cos, -sin, center_x - cos * center_x + sin * center_y,
        sin, cos, center_y - sin * center_x - cos * center_y, 0.0, 0.0]))


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
    level = tf.cast(level, tf.float32)
    return projective_transform(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
    level = tf.cast(level, tf.float32)
    return projective_transform(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
    """Moves the content left by `pixels` (right if negative), as the official op.

    The official code calls tfa's translate with [dx, dy] = [−pixels, 0]; output (x, y) samples
    input (x + pixels, y).
    """
    pixels = tf.cast(pixels, tf.float32)
    return projective_transform(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
    """Moves the content up by `pixels` (down if negative), as the official op."""
    pixels = tf.cast(pixels, tf.float32)
    return projective_transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0]))


def cutout(image: tf.Tensor, half_size: int, seed: tf.Tensor) -> tf.Tensor:
    """Greys out rows [cy−s, cy+s) × cols [cx−s, cx+s) (clipped), centre uniform on the image."""
    shape = tf.shape(image)
    center_y = tf.random.stateless_uniform([], seed, 0, shape[0], dtype=tf.int32)
    center_x = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1),
                                           0, shape[1], dtype=tf.int32)
    rows = tf.range(shape[0])[:, None]
    cols = tf.range(shape[1])[None, :]
    inside = ((rows >= center_y - half_size) & (rows < center_y + half_size)
              & (cols >= center_x - half_size) & (cols < center_x + half_size))
    return tf.where(inside[..., None], tf.constant(FILL_VALUE, image.dtype), image)


# --------------------------------------------------------------------------------------------


# Every op takes (image), (image, argument) or, Cutout, (image, argument, seed).
_OPS = {
    "AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "Posterize": posterize, "Solarize": solarize, "Color": color, "Contrast": contrast,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateX": translate_x, "TranslateY": translate_y, "Cutout": cutout,
    "SolarizeAdd": solarize_add,
}
assert tuple(_OPS) == OP_NAMES


def apply_op(image: tf.Tensor, op_name: str, magnitude: float, sign, seed: tf.Tensor) -> tf.Tensor:
    """One named op at magnitude M; `sign` (±1) negates the signed geometric arguments."""
    if op_name not in _OPS:
        raise ValueError(f"Unknown RandAugment op {op_name!r}; valid: {OP_NAMES}")
    image = tf.convert_to_tensor(image)
    op, argument = _OPS[op_name], op_arguments(magnitude)[op_name]
    if argument is None:
        return op(image)
    if op_name in SIGNED_OPS:
        argument = tf.cast(sign, tf.float32) * argument
    if op_name == "Cutout":
        return op(image, argument, seed)
    return op(image, argument)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
                magnitude: float) -> tf.Tensor:
    """Applies `num_layers` uniformly chosen ops at fixed magnitude to a uint8 [H, W, 3] image.

    Each layer draws (op index, sign, op seed) from its own stateless seed; the official code's
    per-layer probability is sampled but never used, so every chosen op is applied.
    """
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise TypeError(f"RandAugment takes uint8 images, got {image.dtype}.")
    layer_seeds = tf.random.experimental.stateless_split(seed, num_layers)
    for layer in range(num_layers):
        choice_seed, sign_seed, op_seed = tf.unstack(
            tf.random.experimental.stateless_split(layer_seeds[layer], 3))
        op_index = tf.random.stateless_uniform([], choice_seed, 0, len(OP_NAMES), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
        branches = [
            (lambda name=name, current=image: apply_op(current, name, magnitude, sign, op_seed))
            for name in OP_NAMES]
        image = tf.switch_case(op_index, branches)
    return image
