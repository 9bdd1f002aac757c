"""Fashion-MNIST through TFDS (`fashion_mnist_local`) from Debian's idx files, and the pipeline on it.

The expectations are the data set's published facts (Xiao et al. 2017, arXiv:1708.07747: 60,000
training and 10,000 test images, 6,000 and 1,000 per class; the first training and test images
are ankle boots, label 9, as Zalando's and TensorFlow's tutorials show) and an independent reading
of the idx files below (`struct` + `gzip` + numpy, following LeCun's description of the format),
not the builder's own reader. The TFRecord copy is prepared once per session in a temporary
data_dir (about 20 s of CPU on 2 cores).

The files come from `apt-get install -y dataset-fashion-mnist`; .ci/run installs it. Without it
these tests skip, except in CI (`CI` set), where a missing package must fail.
"""

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nfnets_jax.data import config as data_config_lib
from nfnets_jax.data import fashion_mnist, pipeline
from nfnets_jax.data.sources import DatasetUnavailableError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_INSTALLED = all(os.path.isfile(os.path.join(DEBIAN_DIR, name)) for name in (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
needs_files = pytest.mark.skipif(
    not _INSTALLED and not os.environ.get("CI"),
    reason=f"Fashion-MNIST is not installed in {DEBIAN_DIR}: apt-get install -y dataset-fashion-mnist")


def _independent_idx(name: str) -> np.ndarray:
    """idx: magic (2 zero bytes, type 0x08 = uint8, number of dims), big-endian uint32 sizes, data."""
    with open(os.path.join(DEBIAN_DIR, name), "rb") as file:
        raw = gzip.decompress(file.read())
    zero, kind, dims = struct.unpack(">HBB", raw[:4])
    assert (zero, kind) == (0, 0x08)
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    return np.frombuffer(raw[4 + 4 * dims:], np.uint8).reshape(shape)


@pytest.fixture(scope="module")
def idx():
    return {"train": (_independent_idx("train-images-idx3-ubyte.gz"),
                      _independent_idx("train-labels-idx1-ubyte.gz")),
            "test": (_independent_idx("t10k-images-idx3-ubyte.gz"),
                     _independent_idx("t10k-labels-idx1-ubyte.gz"))}


@pytest.fixture(scope="session")
def prepared_data_dir(tmp_path_factory):
    """A data_dir holding the prepared TFRecord copy, made once by the pipeline's own source."""
    data_dir = tmp_path_factory.mktemp("tfds")
    config = data_config_lib.fashion_mnist_data_config()
    config.data_dir = str(data_dir)
    assert pipeline.dataset_info(config) == (10, 60_000, 10_000)  # prepares on first use
    return str(data_dir)


def _config(data_dir: str, **fields) -> object:
    config = data_config_lib.fashion_mnist_data_config()
    config.data_dir = data_dir
    config.shuffle_buffer = 64
    config.num_parallel_calls = 2
    config.prefetch = 1
    for key, value in fields.items():
        config[key] = value
    return config


# ---- The files and the builder's reader --------------------------------------------------------

@needs_files
def test_files_hold_the_published_counts_class_balance_and_first_labels(idx):
    (train_images, train_labels), (test_images, test_labels) = idx["train"], idx["test"]
    assert train_images.shape == (60_000, 28, 28) and test_images.shape == (10_000, 28, 28)
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [1000] * 10)
    assert train_labels[0] == 9 and test_labels[0] == 9  # ankle boots
    assert fashion_mnist.CLASS_NAMES[9] == "Ankle boot"
    # Dark background, bright article: the border of the first image is black, some pixel is white.
    assert train_images[0, 0].max() == 0 and train_images[0].max() == 255


@pytest.mark.slow
@needs_files
def test_builder_reader_matches_the_independent_reading_and_checksums(idx):
    for split in ("train", "test"):
        images, labels = fashion_mnist.read_split(DEBIAN_DIR, split)
        np.testing.assert_array_equal(images, idx[split][0])
        np.testing.assert_array_equal(labels, idx[split][1])
    for name, expected in fashion_mnist.IDX_SHA256.items():
        with gzip.open(os.path.join(DEBIAN_DIR, name)) as file:
            assert hashlib.sha256(file.read()).hexdigest() == expected, name


@pytest.mark.slow
@needs_files
def test_normalisation_statistics_are_the_training_pixels(idx):
    pixels = idx["train"][0].astype(np.float64)
    assert fashion_mnist.TRAIN_MEAN == pytest.approx(pixels.mean(), abs=1e-5)
    assert fashion_mnist.TRAIN_STDDEV == pytest.approx(pixels.std(), abs=1e-5)


def test_a_damaged_file_fails_its_checksum(tmp_path):
    payload = struct.pack(">HBBI", 0, 0x08, 1, 3) + bytes([1, 2, 3])
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(payload))
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(path)), [1, 2, 3])
    with pytest.raises(ValueError, match="decompressed SHA-256"):
        fashion_mnist.read_idx(str(path), hashlib.sha256(payload[:-1] + b"\x04").hexdigest())


def test_missing_package_is_one_line_naming_it_and_nothing_is_written(tmp_path):
    empty, data_dir = tmp_path / "no_files", tmp_path / "data"
    empty.mkdir()
    data_dir.mkdir()
    config = _config(str(data_dir))
    config.fashion_mnist_local.manual_dir = str(empty)
    with pytest.raises(DatasetUnavailableError) as error:
        pipeline.dataset_info(config)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"Fashion-MNIST not found at {empty}")
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert not any(data_dir.iterdir())
    # A folder other than Debian's may also be fixed by pointing the config elsewhere.
    assert message.endswith("or set config.data.fashion_mnist_local.manual_dir")


# ---- Prepared copy: download_and_prepare -> TFRecords -> tfds.load ------------------------------

@pytest.mark.slow
@needs_files
def test_prepared_copy_loads_through_tfds_exactly_as_the_files(prepared_data_dir, idx):
    builder = tfds.builder("fashion_mnist_local", data_dir=prepared_data_dir)
    assert builder.is_prepared()
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
        "train": 60_000, "test": 10_000}
    test = tfds.as_numpy(tfds.load("fashion_mnist_local", split="test", data_dir=prepared_data_dir,
                                   batch_size=-1, download=False))
    np.testing.assert_array_equal(test["image"][..., 0], idx["test"][0])  # PNG: lossless
    np.testing.assert_array_equal(test["label"], idx["test"][1])
    train = tfds.as_numpy(tfds.load("fashion_mnist_local", split="train[:500]", batch_size=-1,
                                    data_dir=prepared_data_dir, download=False))
    np.testing.assert_array_equal(train["image"][..., 0], idx["train"][0][:500])
    # Prepared once: a second source reuses the copy (the files are not needed any more).
    config = _config(prepared_data_dir)
    config.fashion_mnist_local.manual_dir = "/nonexistent"
    assert pipeline.dataset_info(config) == (10, 60_000, 10_000)


# ---- The pipeline on this source ----------------------------------------------------------------

def _denormalise(images: np.ndarray) -> np.ndarray:
    return images * fashion_mnist.TRAIN_STDDEV + fashion_mnist.TRAIN_MEAN


@pytest.mark.slow
@needs_files
def test_eval_two_processes_every_test_image_once_grey_replicated_and_masked(prepared_data_dir, idx):
    config = _config(prepared_data_dir, eval_split="test[:999]")  # 999: padding on both processes
    seen = []
    for process in range(2):
        for batch in pipeline.make_eval_iterator(config, global_batch_size=128, process_index=process,
                                                 process_count=2, local_device_count=2):
            assert batch["images"].shape == (2, 32, 28, 28, 3)
            real = batch["mask"].ravel() == 1
            images = _denormalise(batch["images"].reshape(-1, 28, 28, 3)[real])
            np.testing.assert_allclose(images[..., 1], images[..., 0], atol=1e-3)  # grey in RGB
            np.testing.assert_allclose(images[..., 2], images[..., 0], atol=1e-3)
            seen.extend(zip(np.rint(images[..., 0]).astype(np.uint8), batch["labels"].ravel()[real]))
    assert len(seen) == 999
    # In order: process 0 has examples 0..499, process 1 has 500..998 (np.array_split).
    for index, (image, label) in enumerate(seen):
        np.testing.assert_array_equal(image, idx["test"][0][index])
        assert label == idx["test"][1][index]


def _train_batches(config, steps, *, process_index, process_count, batch, start_step=0):
    """The first `steps` batches of one process's train stream (one local device)."""
    iterator = pipeline.make_train_iterator(config, global_batch_size=batch, seed=7,
                                            start_step=start_step, process_index=process_index,
                                            process_count=process_count, local_device_count=1)
    return [next(iterator) for _ in range(steps)]


@pytest.mark.slow
@needs_files
def test_train_shards_per_process_cover_the_split_once_per_epoch(prepared_data_dir, idx):
    # Without shifts an augmented image is its original or its mirror image: that identifies it.
    config = _config(prepared_data_dir, train_split="train[:96]", max_shift=0)
    originals = idx["train"][0][:96]
    index_of = {image.tobytes(): i for i, image in enumerate(originals)}
    index_of.update({image[:, ::-1].tobytes(): i for i, image in enumerate(originals)})
    epochs = []
    for process in range(2):
        batches = _train_batches(config, 16, process_index=process, process_count=2, batch=12)
        images = np.concatenate([_denormalise(b["images"][0]) for b in batches])
        labels = np.concatenate([b["labels"][0] for b in batches])
        indices = [index_of[np.rint(image[..., 0]).astype(np.uint8).tobytes()] for image in images]
        np.testing.assert_array_equal(labels, idx["train"][1][indices])
        start, end = 48 * process, 48 * (process + 1)
        first, second = indices[:48], indices[48:]
        assert sorted(first) == sorted(second) == list(range(start, end))  # each epoch: its shard
        assert first != second  # reshuffled per epoch
        epochs.append(set(first))
    assert not epochs[0] & epochs[1]


@pytest.mark.slow
@needs_files
def test_resume_from_start_step_equals_the_fresh_stream(prepared_data_dir):
    # 96 examples, 40 per step: steps 2 and 3 cross the epoch boundary.
    config = _config(prepared_data_dir, train_split="train[:96]")
    fresh = _train_batches(config, 4, process_index=1, process_count=2, batch=40)
    resumed = _train_batches(config, 2, process_index=1, process_count=2, batch=40,
                                    start_step=2)
    for got, expected in zip(resumed, fresh[2:], strict=True):
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@pytest.mark.slow
@needs_files
def test_train_images_are_shifted_and_flipped_originals(prepared_data_dir, idx):
    config = _config(prepared_data_dir, train_split="train[:64]", shuffle_buffer=0)
    batch = _train_batches(config, 1, process_index=0, process_count=1, batch=64)[0]
    images = np.rint(_denormalise(batch["images"][0][..., 0]))
    flips = 0
    for image, original in zip(images, idx["train"][0][:64]):  # no shuffle: in file order
        candidates = {}
        for flipped in (False, True):
            source = original[:, ::-1] if flipped else original
            padded = np.pad(source.astype(np.float64), 4)
            for dy in range(9):
                for dx in range(9):
                    candidates[(flipped, dy, dx)] = padded[dy:dy + 28, dx:dx + 28]
        matches = [key for key, crop in candidates.items() if np.array_equal(crop, image)]
        assert matches, "not a shifted (and possibly flipped) copy of its original"
        flips += all(key[0] for key in matches)
    assert 10 < flips < 54  # about half flipped (p = 1/2; 64 draws)
