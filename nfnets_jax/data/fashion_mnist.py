"""Fashion-MNIST from local idx files, as a TFDS dataset: `fashion_mnist_local`, prepared offline.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747): 60,000 training and 10,000 test
28×28 grayscale images of clothing in 10 classes, in the idx format of MNIST. Debian's package
`dataset-fashion-mnist` installs the four original idx files, gzipped, in
/usr/share/datasets/fashion-mnist. Their idx contents are Zalando's, but Debian re-wrote the
gzip headers (the stored file name is dropped: each file is 24 bytes shorter than the one TFDS
downloads), so TFDS's own `fashion_mnist` builder, which checks the .gz files against its
registered checksums, cannot use them, and it would download from the network anyway.

This builder reads the files from a manual folder instead (TFDS's `manual_dir`), never from the
network, and checks them with its own checksums: the SHA-256 of each *decompressed* idx payload,
which holds for Debian's files and for Zalando's originals alike (a re-compression cannot change
it). `download_and_prepare` writes the usual TFRecord copy under the data_dir, once; the input
pipeline (`sources.tfds_source`) then reads that copy as it reads any other TFDS dataset.
Importing this module registers the builder, so `tfds.load("fashion_mnist_local", data_dir=...)`
works too.

Images are stored as they are, 28×28×1; the pipeline replicates the grey channel to RGB
(`sources.tfds_source`) because every model here takes 3-channel NHWC input.
"""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "fashion_mnist_local"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # where the Debian package installs the files

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")  # label 0..9, Zalando's README

# split -> (images file, labels file, number of examples)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
FILE_NAMES = tuple(name for images, labels, _ in SPLIT_FILES.values() for name in (images, labels))

# SHA-256 of the decompressed idx payloads (`zcat FILE | sha256sum`), computed from Debian's
# dataset-fashion-mnist 0.0~git20200523.55506a9-1. The .gz files differ from Zalando's only in
# their gzip headers (Debian's are 24 bytes shorter than the sizes TFDS registers for the
# originals: 26,421,880, 29,515, 4,422,102 and 5,148 bytes).
IDX_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# Mean and standard deviation of all 60,000 × 784 training pixels, in [0, 255] units (the same
# for the three replicated channels); tests/test_data_fashion_mnist.py recomputes them.
TRAIN_MEAN = 72.940352
TRAIN_STDDEV = 90.021182

_IDX_MAGIC = {3: 2051, 1: 2049}  # idx3 (uint8 images) and idx1 (uint8 labels), big-endian


def missing_files_message(manual_dir: str) -> str | None:
    """One line saying how to get the files, or None when all four are in `manual_dir`."""
    missing = [name for name in FILE_NAMES if not os.path.isfile(os.path.join(manual_dir, name))]
    if not missing:
        return None
    how = (f"apt-get install -y {DEBIAN_PACKAGE}" if os.path.abspath(manual_dir) == DEBIAN_DIR else
           f"put the four idx .gz files there (apt-get install -y {DEBIAN_PACKAGE} installs them in "
           f"{DEBIAN_DIR}) or set config.data.fashion_mnist_local.manual_dir")
    return (f"Fashion-MNIST not found at {manual_dir} (missing {', '.join(missing)}): {how}")


def read_idx(path: str, expected_sha256: str | None = None) -> np.ndarray:
    """A gzipped idx file as a uint8 array; checks its header and the payload's checksum.

    idx format (LeCun's MNIST page): big-endian magic 0x0000080D (uint8, D dims), D uint32 sizes,
    then the data. Raises ValueError naming the file when anything does not match.
    """
    with gzip.open(path, "rb") as file:
        payload = file.read()
    if expected_sha256 is not None:
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected_sha256:
            raise ValueError(f"{path}: decompressed SHA-256 {actual} is not Fashion-MNIST's "
                             f"{expected_sha256}; the file is damaged or another data set.")
    magic = int.from_bytes(payload[:4], "big")
    dims = payload[3]
    if _IDX_MAGIC.get(dims) != magic:
        raise ValueError(f"{path}: not a uint8 idx1/idx3 file (magic {magic:#010x}).")
    shape = tuple(int.from_bytes(payload[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(payload, np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, payload holds {data.size} bytes.")
    return data.reshape(shape)


def read_split(manual_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 28, 28], uint8 labels [N]) of 'train' or 'test', checksums verified.
    Raises FileNotFoundError with the one-line fix (`missing_files_message`) when files are missing."""
    message = missing_files_message(manual_dir)
    if message:
        raise FileNotFoundError(message)
    images_file, labels_file, count = SPLIT_FILES[split]
    images = read_idx(os.path.join(manual_dir, images_file), IDX_SHA256[images_file])
    labels = read_idx(os.path.join(manual_dir, labels_file), IDX_SHA256[labels_file])
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape}, labels {labels.shape}; "
                         f"expected ({count}, 28, 28) and ({count},).")
    return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST prepared from the idx files in `manual_dir` (default: Debian's folder)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Zalando's 60,000/10,000 split, read from local idx files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"`apt-get install -y {DEBIAN_PACKAGE}` (files in {DEBIAN_DIR}), or copy "
        f"{', '.join(FILE_NAMES)} from https://github.com/zalandoresearch/fashion-mnist into the "
        "manual folder.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. TFDS's own lookup of a builder's file needs `importlib_resources` for any
        builder outside tensorflow_datasets, a module TFDS 4.9 does not declare as a dependency
        (tensorflow/datasets issue #11212); there is no checksums file next to it to find."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST: 28x28 grayscale images of Zalando articles, 10 classes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
            # Keep the files' order (TFDS would shuffle by key hash): example i of a split is
            # image i of its idx file, so 'train[50000:]' means the same images as elsewhere.
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation="Xiao, Rasul and Vollgraf, Fashion-MNIST: a Novel Image Dataset for "
                     "Benchmarking Machine Learning Algorithms, arXiv:1708.07747, 2017.",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        message = missing_files_message(manual_dir)
        if message:
            raise FileNotFoundError(message)
        return {split: self._generate_examples(*read_split(manual_dir, split))
                for split in SPLIT_FILES}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[:, :, None], "label": int(label)}
