"""The pretrained models shipped in the package: found by name, verified, and what their cards say is true.

The shipped file's accuracy itself is recomputed on the full Fashion-MNIST test split by
notebooks/quickstart.ipynb (whose stored output shows it); here the export command's numbers are
checked against an independent evaluation on a run small enough for the suite.
"""

import dataclasses
import hashlib
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models, weights
from nfnets_jax.weights import pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
NAME = "nfnet_fashion_mnist"


def test_every_shipped_model_has_its_file_and_a_card_whose_digest_is_the_files():
    for name in weights.PRETRAINED_MODELS:
        card = weights.pretrained_model(name)
        digest = hashlib.sha256(card.path.read_bytes()).hexdigest()
        assert card.name == name and digest == card.sha256
        assert card.path.stat().st_size < 10 * 2**20  # a few MB in the repository, no more


def test_the_shipped_params_fit_the_model_the_card_describes():
    params, card = weights.load_pretrained(NAME)
    forward = card.make_forward()
    abstract, state = models.abstract_init(forward, card.image_size)
    weights.check_params_match(params, abstract)
    assert not state  # NFNets keep no state: the params are the whole model
    assert len(card.class_names) == card.num_classes == params["NFNet/~/linear"]["b"].shape[0]
    assert card.test_examples == 10_000 and 0.9 < card.test_top_1 < 1.0
    logits, _ = jax.jit(lambda p, x: forward.apply(p, {}, None, x, is_training=False))(
        params, jnp.zeros((2, card.image_size, card.image_size, 3)))
    assert logits.shape == (2, card.num_classes) and bool(jnp.all(jnp.isfinite(logits)))


def test_docs_state_the_shipped_files_digest_and_accuracy():
    page = (REPO / "docs" / "weights.md").read_text()
    card = weights.pretrained_model(NAME)
    assert card.sha256 in page
    assert f"{100 * card.test_top_1:.2f}%" in page


def test_a_file_that_is_not_the_cards_is_refused(tmp_path):
    for path in pretrained.FILES_DIR.iterdir():
        shutil.copy(path, tmp_path / path.name)
    npz = tmp_path / f"{NAME}.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 1
    npz.write_bytes(bytes(data))
    with pytest.raises(weights.ChecksumMismatchError, match="re-export it"):
        weights.load_pretrained(NAME, files_dir=tmp_path)


def test_unknown_names_and_malformed_cards_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=f"no pretrained model 'nfnet_f0'; this package ships {NAME}"):
        weights.load_pretrained("nfnet_f0")
    card = json.loads((pretrained.FILES_DIR / f"{NAME}.json").read_text())
    del card["sha256"]
    card["extra"] = 1
    (tmp_path / f"{NAME}.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"missing \['sha256'\], unknown \['extra'\]"):
        weights.pretrained_model(NAME, files_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="reinstall"):
        weights.pretrained_model(NAME, files_dir=tmp_path / "nowhere")


def test_a_card_survives_its_json():
    card = weights.pretrained_model(NAME)
    again = weights.PretrainedModel.from_json(card.to_json())
    assert again == card and isinstance(again.model_kwargs["widths"], tuple)
    assert dataclasses.asdict(again) == json.loads(card.to_json()) | {
        "class_names": card.class_names, "mean_rgb": card.mean_rgb, "stddev_rgb": card.stddev_rgb,
        "model_kwargs": dict(card.model_kwargs)}


@pytest.mark.slow
def test_the_export_command_states_what_its_file_computes(tmp_path, capsys):
    """A 3-step digits run, refused while unfinished, then exported; the card's top-1 recomputed
    from the digits arrays by hand."""
    from experiments import export_weights  # pylint: disable=import-outside-toplevel
    from nfnets_jax import train  # pylint: disable=import-outside-toplevel
    from nfnets_jax.data import sources  # pylint: disable=import-outside-toplevel
    from nfnets_jax.train import config_files  # pylint: disable=import-outside-toplevel

    config = config_files.load_config("digits")
    config.train.steps = 3
    config.optimizer.warmup_epochs = 0.0
    workdir = tmp_path / "run"
    provenance = json.dumps({"argv": ["train.py", "--config=configs/digits.py", f"--workdir={workdir}"],
                             "git": {"commit": "0123456789abcdef"}})
    out = tmp_path / "files"
    train.run(train.build_experiment(config), str(workdir), num_steps=2, verbose=False)  # stopped early
    (workdir / "provenance.json").write_text(provenance)
    with pytest.raises(SystemExit):
        export_weights.main([f"--workdir={workdir}", f"--name={NAME}", f"--out_dir={out}"])
    assert "stopped at step 2 of 3" in capsys.readouterr().err and not out.exists()

    train.run(train.build_experiment(config), str(workdir), verbose=False)  # resumed to the end
    (workdir / "provenance.json").write_text(provenance)
    export_weights.main([f"--workdir={workdir}", f"--name={NAME}", f"--out_dir={out}"])

    params, card = weights.load_pretrained(NAME, files_dir=out)
    assert card.config == "digits" and card.train_steps == 3 and card.dataset == "digits"
    assert card.class_names == tuple("0123456789") and card.image_size == 32
    arrays = sources.load_digits_arrays(32, 0.2, 0)
    train_pixels = arrays["train"][0].astype(np.float64)
    assert card.mean_rgb == (train_pixels.mean(),) * 3 and card.stddev_rgb == (train_pixels.std(),) * 3
    images, labels = arrays["test"]
    inputs = (images.astype(np.float32) - np.float32(card.mean_rgb[0])) / np.float32(card.stddev_rgb[0])
    logits, _ = card.make_forward().apply(params, {}, None, jnp.asarray(inputs), is_training=False)
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    assert card.test_examples == len(labels) and card.test_top_1 == pytest.approx(accuracy, abs=1e-4)
    assert "commit 0123456789ab" in card.command and f"--workdir={workdir}" in card.command


def test_the_export_command_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from experiments import export_weights  # pylint: disable=import-outside-toplevel

    with pytest.raises(SystemExit):
        export_weights.main([f"--workdir={tmp_path}", f"--out_dir={tmp_path / 'out'}"])
    assert "config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
