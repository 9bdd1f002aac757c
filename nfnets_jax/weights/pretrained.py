"""Models trained by this project, shipped inside the package and loaded by name.

    params, card = weights.load_pretrained("nfnet_fashion_mnist")
    forward = card.make_forward()           # forward.apply(params, {}, None, images, is_training=False)

Each model is two files in `nfnets_jax/weights/files/`: `<name>.npz`, its EMA params in our
pickle-free `.npz` (`npz_format`), and `<name>.json`, its card: the file's SHA-256 (checked on
every load), the model and its kwargs, what its inputs are (size, normalisation, classes), the test
accuracy of exactly that file and the command that trained and exported it. Both are written by
`python -m experiments.export_weights` from a finished training workdir (docs/weights.md), so a
card never states a number that its file was not measured to give.

Unlike DeepMind's and timm's weights (`released`, `timm_nfnet`), nothing is downloaded:
`pip install` carries the files (setup.py's package_data).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from nfnets_jax.weights.download import ChecksumMismatchError, normalize_sha256, sha256_of_file
from nfnets_jax.weights.npz_format import load_npz
from nfnets_jax.weights.param_tree import Params

FILES_DIR = pathlib.Path(__file__).resolve().parent / "files"

PRETRAINED_MODELS = ("nfnet_fashion_mnist",)  # each has files/<name>.npz and files/<name>.json


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    """The card of one shipped model: what its weight file holds and how it was made.

    Inputs are `image_size`² RGB images normalised as (pixel − mean_rgb) / stddev_rgb, pixels in
    [0, 255] units; `preprocessing` says how the data set's images became such inputs (the eval
    side of `config`, the project config it was trained with, does exactly that).
    """

    name: str
    file: str  # in FILES_DIR
    sha256: str
    model_name: str  # a `models.list_models()` name
    model_kwargs: Mapping[str, Any]
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    mean_rgb: tuple[float, float, float]
    stddev_rgb: tuple[float, float, float]
    preprocessing: str
    dataset: str
    config: str  # the project config it was trained with (`config_files.load_config` name)
    train_steps: int
    test_top_1: float  # of this file's params, measured by the export command
    test_examples: int
    command: str  # the commands that trained and exported it

    @property
    def path(self) -> pathlib.Path:
        return FILES_DIR / self.file

    def make_forward(self):  # -> hk.TransformedWithState (haiku imported only when asked)
        """The classifier these params belong to (`models.make_forward`):
        `forward.apply(params, {}, None, images, is_training=False) -> (logits, state)`."""
        from nfnets_jax import models  # pylint: disable=import-outside-toplevel  (haiku, jax)

        return models.make_forward(self.model_name, self.num_classes, dict(self.model_kwargs))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "PretrainedModel":
        """A card from its JSON; a missing or unknown field is a ValueError naming it."""
        raw = json.loads(text)
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            found = set(raw) if isinstance(raw, dict) else set()
            raise ValueError(f"not a model card: missing {sorted(names - found)}, unknown {sorted(found - names)}")
        normalize_sha256(raw["sha256"])
        return cls(**{**raw, "class_names": tuple(raw["class_names"]), "mean_rgb": tuple(raw["mean_rgb"]),
                      "stddev_rgb": tuple(raw["stddev_rgb"]),
                      "model_kwargs": {key: tuple(value) if isinstance(value, list) else value
                                       for key, value in raw["model_kwargs"].items()}})


def pretrained_model(name: str, files_dir: str | os.PathLike = FILES_DIR) -> PretrainedModel:
    """The card of the shipped model `name` (see `PRETRAINED_MODELS`).

    Raises:
      ValueError: an unknown name (listing the known ones), or a card that is not one.
      FileNotFoundError: the card is missing (an installation without package data).
    """
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"no pretrained model {name!r}; this package ships {', '.join(PRETRAINED_MODELS)}")
    card_path = pathlib.Path(files_dir) / f"{name}.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} is missing: reinstall nfnets-jax (pip install .), whose "
                                "package data holds the pretrained models")
    return PretrainedModel.from_json(card_path.read_text(encoding="utf-8"))


def load_pretrained(name: str, files_dir: str | os.PathLike = FILES_DIR) -> tuple[Params, PretrainedModel]:
    """(params, card) of the shipped model `name`, the file verified against the card's SHA-256.

    Raises:
      ValueError: an unknown name; ChecksumMismatchError: the file is not the one the card
      describes (damaged, or replaced without re-exporting); FileNotFoundError: a file is missing.
    """
    card = pretrained_model(name, files_dir)
    path = pathlib.Path(files_dir) / card.file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall nfnets-jax (pip install .)")
    actual = sha256_of_file(path)
    if actual != card.sha256:
        raise ChecksumMismatchError(f"{path} has sha256 {actual}, but its card says {card.sha256}; "
                                    "re-export it (python -m experiments.export_weights) or reinstall")
    return load_npz(path), card
