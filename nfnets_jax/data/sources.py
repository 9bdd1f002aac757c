"""Where examples come from: TFDS datasets, a deterministic synthetic source, scikit-learn digits.

Fashion-MNIST is one of the TFDS datasets: `fashion_mnist_local` (fashion_mnist.py) is a TFDS
builder over local idx files, prepared offline on first use; then it is read like any other.

Every source serves `{'image', 'label'}` examples from absolute index ranges of a split, so that
the pipeline can give each process its own contiguous slice (official `dataset.py:_shard`) and read
each epoch in a seeded order. Images are either JPEG bytes (`encoded=True`, decoded later
together with the crop, as the official `dataset.py` does) or uint8 `[H, W, 3]` arrays
(grayscale datasets have their one channel replicated to three: every model takes RGB input).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import ml_collections
import numpy as np

from nfnets_jax.runtime.program_output import import_tensorflow

import_tensorflow()  # TensorFlow's C++ start-up notices held back (runtime/program_output.py)
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow_datasets as tfds

from nfnets_jax.data import fashion_mnist  # registers the `fashion_mnist_local` TFDS builder

# ImageNet RGB statistics in [0, 255] units (official `dataset.py:MEAN_RGB`).
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class DatasetUnavailableError(RuntimeError):
    """The requested dataset is not prepared on disk; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A split-addressable example source.

    Attributes:
      name: dataset name, for messages.
      num_classes: number of label classes.
      encoded: True when `image` holds JPEG bytes, False when uint8 `[H, W, 3]` arrays.
      fixed_size: True when images already have their final size (digits): training then only
        shifts them instead of the ImageNet crop, and evaluation takes them as they are.
      mean_rgb, stddev_rgb: normalisation statistics in [0, 255] units.
      split_size: split name or TFDS split spec -> number of examples.
      read: (split, start, end, shuffle_seed) -> tf.data.Dataset of the examples with absolute
        indices [start, end) of the split; in index order when shuffle_seed is None, otherwise
        in an order that depends only on shuffle_seed.
      lookup: for in-memory sources, split -> (int index tensor -> example), so an epoch can be
        an exact seeded permutation; None for file-backed sources (TFDS).
    """

    name: str
    num_classes: int
    encoded: bool
    fixed_size: bool
    mean_rgb: tuple[float, float, float]
    stddev_rgb: tuple[float, float, float]
    split_size: Callable[[str], int]
    read: Callable[[str, int, int, "int | None"], tf.data.Dataset]
    lookup: Callable[[str], Callable[[tf.Tensor], dict]] | None = None


def make_source(data_config: ml_collections.ConfigDict) -> Source:
    """Builds the source named by `config.data.name` ('digits', 'synthetic' or a TFDS name)."""
    if data_config.name == "digits":
        return digits_source(data_config.digits)
    if data_config.name == "synthetic":
        return synthetic_source(data_config.synthetic)
    splits = (data_config.train_split, data_config.eval_split)
    if data_config.name == fashion_mnist.NAME:
        return fashion_mnist_source(data_config.data_dir, data_config.fashion_mnist_local.manual_dir,
                                    splits)
    return tfds_source(data_config.name, data_config.data_dir, splits)


# --------------------------------------------------------------------------------------------
# In-memory sources: random access, so an epoch is an exact seeded permutation.


def _reader(lookup):
    """`read` for an in-memory source: its lookup over an ordered or seeded-shuffled range."""
    def read(split: str, start: int, end: int, shuffle_seed: int | None) -> tf.data.Dataset:
        indices = np.arange(start, end, dtype=np.int64)
        if shuffle_seed is not None:
            np.random.default_rng(shuffle_seed).shuffle(indices)
        return tf.data.Dataset.from_tensor_slices(indices).map(lookup(split))
    return read


@functools.lru_cache(maxsize=4)
def load_digits_arrays(image_size: int, test_fraction: float, split_seed: int):
    """scikit-learn's 1,797 handwritten 8x8 digits as uint8 RGB `image_size`² images.

    Pixel values 0..16 are scaled to 0..255, upsampled bilinearly (a smooth stroke, not 4x4
    blocks), and the grey level copied to three channels. The train/test split is stratified
    by class with a fixed seed, so it is identical on every run and machine.

    Returns:
      {'train': (images, labels), 'test': (images, labels)} with uint8 images, int32 labels.
    """
    from sklearn import datasets, model_selection  # Imported here: only the demo needs it.

    digits = datasets.load_digits()
    grey = digits.images.astype(np.float32) * (255.0 / 16.0)
    resized = tf.image.resize(grey[..., None], (image_size, image_size), method="bilinear")
    images = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
    images = np.repeat(images, 3, axis=-1)
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = model_selection.train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels,
        random_state=split_seed)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return {"train": (images[train_idx], labels[train_idx]),
            "test": (images[test_idx], labels[test_idx])}


def digits_source(digits_config: ml_collections.ConfigDict) -> Source:
    """The offline demo dataset: scikit-learn digits, precomputed in memory (fast per step).

    Normalised by the mean and standard deviation of the training pixels, so inputs have unit
    variance as the NF signal-propagation analysis assumes (paper §2).
    """
    arrays = load_digits_arrays(int(digits_config.image_size), float(digits_config.test_fraction),
                                int(digits_config.split_seed))
    train_pixels = arrays["train"][0].astype(np.float64)
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    images = {split: tf.constant(pair[0]) for split, pair in arrays.items()}
    labels = {split: tf.constant(pair[1]) for split, pair in arrays.items()}

    def split_size(split: str) -> int:
        if split not in labels:
            raise ValueError(f"The digits source has splits 'train' and 'test', not {split!r}.")
        return int(labels[split].shape[0])

    def lookup(split: str):
        split_size(split)

        @tf.autograph.experimental.do_not_convert  # nothing to convert; AutoGraph cannot parse it
        def example(index):
            return {"image": tf.gather(images[split], index), "label": tf.gather(labels[split], index)}

        return example

    return Source(name="digits", num_classes=10, encoded=False, fixed_size=True,
                  mean_rgb=(mean,) * 3, stddev_rgb=(std,) * 3, split_size=split_size,
                  read=_reader(lookup), lookup=lookup)


# --------------------------------------------------------------------------------------------
# Synthetic: deterministic ImageNet-sized photos-like images, for benchmarks and smoke tests.

_SYNTHETIC_POOL = 64  # distinct images; example i shows image i % 64


@functools.lru_cache(maxsize=4)
def _synthetic_pool(height: int, width: int, encode_jpeg: bool) -> np.ndarray:
    """Smooth random colour fields (low-frequency noise upsampled), like photos to a JPEG coder.

    White noise would make JPEG decoding several times slower than for real photographs and
    distort the benchmark, so the content is deliberately smooth.
    """
    rng = np.random.default_rng(1234)
    coarse = rng.uniform(0, 255, size=(_SYNTHETIC_POOL, 12, 16, 3)).astype(np.float32)
    fine = tf.image.resize(coarse, (height, width), method="bicubic").numpy()
    fine += rng.normal(0, 6, size=fine.shape).astype(np.float32)  # some texture
    pixels = np.clip(fine, 0, 255).astype(np.uint8)
    if not encode_jpeg:
        return pixels
    return np.array([tf.io.encode_jpeg(image, quality=90).numpy() for image in pixels],
                    dtype=object)


def synthetic_source(synthetic_config: ml_collections.ConfigDict) -> Source:
    """A deterministic source with no files: example i is pool image i % 64, label (i % 64) % C.

    The label is a function of the image, so a model can learn it (a useful smoke test), and
    the 'train' and any other split have the configured sizes.
    """
    pool = _synthetic_pool(int(synthetic_config.height), int(synthetic_config.width),
                           bool(synthetic_config.encode_jpeg))
    num_classes = int(synthetic_config.num_classes)
    pool_tensor = tf.constant(list(pool) if pool.dtype == object else pool)

    def split_size(split: str) -> int:
        return int(synthetic_config.num_train_examples if split.startswith("train")
                   else synthetic_config.num_eval_examples)

    def example(index):
        slot = tf.cast(index % _SYNTHETIC_POOL, tf.int32)
        return {"image": tf.gather(pool_tensor, slot),
                "label": tf.cast(slot % num_classes, tf.int32)}

    def lookup(split: str):
        del split  # Every split draws from the same pool.
        return example

    return Source(name="synthetic", num_classes=num_classes,
                  encoded=bool(synthetic_config.encode_jpeg), fixed_size=False,
                  mean_rgb=IMAGENET_MEAN_RGB, stddev_rgb=IMAGENET_STDDEV_RGB,
                  split_size=split_size, read=_reader(lookup), lookup=lookup)


# --------------------------------------------------------------------------------------------
# TFDS: any prepared image-classification dataset with `image` and `label` features.


def _data_dir_root(data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _preparation_message(builder, name: str, data_dir: str | None) -> str:
    root = _data_dir_root(data_dir)
    flag = f"--data_dir={root}"
    lines = [f"TFDS dataset {name!r} is not prepared under data_dir {root!r}."]
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        manual_dir = os.path.join(root, "downloads", "manual")
        if name.split(":")[0] == "imagenet2012":
            missing = [f for f in IMAGENET_MANUAL_FILES
                       if not os.path.exists(os.path.join(manual_dir, f))]
            if missing:
                lines.append(f"Missing manual files in {manual_dir}: {', '.join(missing)}. "
                             "Download them from https://image-net.org/download-images "
                             "(registration required) and place them there.")
        else:
            lines.append(f"This dataset needs files downloaded by hand into {manual_dir}: "
                         + " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split()))
    lines.append(f"Then prepare it once: `tfds build {name} {flag}` (or in Python: "
                 f"tfds.builder({name!r}, data_dir={root!r}).download_and_prepare()), and "
                 f"point config.data.data_dir at {root!r}.")
    return "\n".join(lines)


def _resolve_split(builder, split: str, count_fn) -> tuple[str, int, int]:
    """A split spec ('train', 'train[10000:]', 'validation[:50%]') -> (name, start, end)."""
    instruction = tfds.core.ReadInstruction.from_spec(split)
    name = instruction.split_name
    if builder.info.splits and name not in builder.info.splits:
        raise ValueError(f"Split {split!r}: {builder.name} has splits "
                         f"{sorted(builder.info.splits)}; set config.data.train_split / "
                         "eval_split to one of them.")
    known = builder.info.splits.get(name) if builder.info.splits else None
    total = known.num_examples if known is not None else count_fn(name)
    absolute = instruction.to_absolute(
        {name: tfds.core.SplitInfo(name=name, shard_lengths=[total], num_bytes=0)})
    if len(absolute) != 1:
        raise ValueError(f"Split {split!r} must name one split (no '+'), e.g. 'train[10000:]'.")
    start = absolute[0].from_ or 0
    end = total if absolute[0].to is None else absolute[0].to
    return name, start, end


def tfds_source(name: str, data_dir: str | None, splits: tuple[str, ...] = ("train",), *,
                mean_rgb: tuple[float, float, float] = IMAGENET_MEAN_RGB,
                stddev_rgb: tuple[float, float, float] = IMAGENET_STDDEV_RGB) -> Source:
    """A prepared TFDS dataset; raises DatasetUnavailableError saying how to prepare it if not.

    Never downloads: preparing ImageNet needs the manual tar files and hours of work, which
    belongs in an explicit `tfds build`, not in a training run (`fashion_mnist_source` prepares
    its dataset itself, from local files, before calling this).

    Args:
      name: TFDS name, e.g. 'imagenet2012', 'cifar10', 'fashion_mnist_local'.
      data_dir: TFDS data_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      splits: split specs the run reads; checked to be prepared before anything else happens.
      mean_rgb, stddev_rgb: normalisation statistics in [0, 255] units (default ImageNet's).
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DatasetUnavailableError(
            f"Unknown dataset {name!r}: config.data.name must be 'digits', 'synthetic' or a "
            f"TFDS dataset name such as 'imagenet2012' or 'cifar10'.") from error
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"TFDS dataset {name!r} has features {list(features)}; the pipeline "
                         "needs an image-classification dataset with 'image' and 'label'.")
    # JPEG datasets (ImageNet) are decoded fused with the crop; others (PNG) are decoded by TFDS.
    encoded = getattr(features["image"], "encoding_format", None) == "jpeg"
    decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None

    # An ordered dataset (`disable_shuffling`, fashion_mnist_local) keeps its files in order:
    # TFDS refuses to shuffle them, and the train stream's record shuffle does the mixing.
    shuffle_files = not builder.info.disable_shuffling

    def as_dataset(split, shuffle_seed=None):
        # The file order must not change between iterations: the train stream re-iterates this
        # dataset once per epoch, and a resumed stream starts at a later epoch, so a per-iteration
        # reshuffle (TFDS's default) would give it another file order than the fresh stream.
        try:
            return builder.as_dataset(
                split=split, decoders=decoders,
                shuffle_files=shuffle_files and shuffle_seed is not None,
                read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                            shuffle_reshuffle_each_iteration=False,
                                            try_autocache=False))
        except AssertionError as error:  # TFDS's "could not find data" for unprepared builders
            raise DatasetUnavailableError(_preparation_message(builder, name, data_dir)) from error

    def count(split_name: str) -> int:
        dataset = as_dataset(split_name)
        cardinality = int(dataset.cardinality())
        if cardinality >= 0:
            return cardinality
        return int(dataset.reduce(np.int64(0), lambda total, _: total + 1))

    if not builder.is_prepared():
        for split in splits:  # Raises the preparation message (unless TFDS is mocked in tests).
            as_dataset(tfds.core.ReadInstruction.from_spec(split).split_name)

    resolve = functools.lru_cache(maxsize=8)(lambda split: _resolve_split(builder, split, count))

    def split_size(split: str) -> int:
        _, start, end = resolve(split)
        return end - start

    # Grayscale images (MNIST-like) get their channel replicated: the models take RGB input, and
    # RGB with equal channels keeps RandAugment's colour ops and pretrained stems meaningful.
    grey = not encoded and features["image"].shape[-1] == 1

    def read(split: str, start: int, end: int, shuffle_seed: int | None) -> tf.data.Dataset:
        split_name, offset, _ = resolve(split)
        instruction = tfds.core.ReadInstruction(split_name, from_=offset + start,
                                                to=offset + end, unit="abs")
        dataset = as_dataset(instruction, shuffle_seed)
        return dataset.map(lambda ex: {
            "image": tf.image.grayscale_to_rgb(ex["image"]) if grey else ex["image"],
            "label": tf.cast(ex["label"], tf.int32)})

    return Source(name=name, num_classes=int(features["label"].num_classes), encoded=encoded,
                  fixed_size=False, mean_rgb=tuple(mean_rgb), stddev_rgb=tuple(stddev_rgb),
                  split_size=split_size, read=read)


def fashion_mnist_source(data_dir: str | None, manual_dir: str,
                         splits: tuple[str, ...] = ("train", "test")) -> Source:
    """Fashion-MNIST through TFDS (`fashion_mnist_local`), prepared on first use, then reused.

    Preparing reads the four idx files in `manual_dir` (never the network), checks their
    checksums and writes TFRecords under `data_dir` in seconds: so, unlike ImageNet, it happens
    here rather than in an explicit `tfds build`. TFDS writes into a temporary folder and renames
    it when complete, so an interrupted preparation leaves nothing that looks prepared. Missing
    files are one line naming the Debian package, before anything is written.

    Normalised by the training pixels' mean and standard deviation (equal for the three
    replicated channels), so inputs have unit variance as the NF signal-propagation analysis
    assumes (paper §2).
    """
    builder = tfds.builder(fashion_mnist.NAME, data_dir=data_dir)
    if not builder.is_prepared():
        message = fashion_mnist.missing_files_message(manual_dir)
        if message:
            raise DatasetUnavailableError(message)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return tfds_source(fashion_mnist.NAME, data_dir, splits,
                       mean_rgb=(fashion_mnist.TRAIN_MEAN,) * 3,
                       stddev_rgb=(fashion_mnist.TRAIN_STDDEV,) * 3)
