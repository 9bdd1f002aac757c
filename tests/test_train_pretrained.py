"""Starting from trained weights: a fresh head, everything else loaded, mismatches listed."""

import pathlib

import chex
import numpy as np
import pytest

from nfnets_jax import weights
import fakes  # tests/fakes.py
from nfnets_jax.train import checkpointing, loop

HEAD = [r"^[^/]+/~/linear/"]
REPO = pathlib.Path(__file__).resolve().parents[1]


def _tree(num_classes, fill):
    return {"net/~/conv": {"w": np.full((3, 3, 2, 4), fill, np.float32), "gain": np.full(4, fill, np.float32)},
            "net/~/linear": {"w": np.full((4, num_classes), fill, np.float32),
                             "b": np.full(num_classes, fill, np.float32)}}


def test_merge_keeps_the_fresh_head_and_loads_the_rest():
    loaded, fresh = _tree(1000, 1.0), _tree(10, 0.0)  # ImageNet weights, a 10-class target
    merged = weights.merge_pretrained(loaded, fresh, exclude=HEAD)
    chex.assert_trees_all_equal(merged["net/~/conv"], loaded["net/~/conv"])
    chex.assert_trees_all_equal(merged["net/~/linear"], fresh["net/~/linear"])


def test_merge_lists_every_missing_and_wrong_shaped_parameter():
    loaded = _tree(1000, 1.0)
    loaded["net/~/conv"]["w"] = np.zeros((1, 1, 2, 4), np.float32)
    del loaded["net/~/conv"]["gain"]
    with pytest.raises(weights.ParamsMismatchError) as error:
        weights.merge_pretrained(loaded, _tree(10, 0.0), exclude=HEAD)
    assert "net/~/conv/gain" in str(error.value) and "wrong shape: net/~/conv/w" in str(error.value)


def test_read_params_tells_our_npz_from_a_workdir(tmp_path):
    tree = _tree(3, 2.0)
    weights.save_npz(str(tmp_path / "ours.npz"), tree)
    chex.assert_trees_all_equal(checkpointing.read_params(str(tmp_path / "ours.npz")), tree)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpointing.read_params(str(tmp_path))


def _train_source(workdir, num_classes):
    config = fakes.fake_config(**{"train.steps": 2})
    loop.run(fakes.fake_experiment(config, fakes.FakeData(num_classes=num_classes)), workdir)
    return checkpointing.read_params(workdir)


@pytest.mark.slow
def test_fine_tuning_run_starts_from_the_loaded_weights_and_a_fresh_excluded_part(tmp_path):
    trained = _train_source(str(tmp_path / "source"), num_classes=3)["fake_net/~/linear"]
    assert np.any(trained["b"] != 0)
    # LR 0: after one step the params are still where fine-tuning started them.
    config = fakes.fake_config(**{"train.steps": 1, "optimizer.lr": 0.0})
    experiment = fakes.fake_experiment(config, fakes.FakeData(num_classes=3))
    source = checkpointing.read_params(str(tmp_path / "source"))
    experiment.initial_params = lambda fresh: weights.merge_pretrained(source, fresh, exclude=[r"/b$"])
    loop.run(experiment, str(tmp_path / "finetune"))
    started = checkpointing.read_workdir_state(str(tmp_path / "finetune"))["params"]["fake_net/~/linear"]
    np.testing.assert_array_equal(started["w"], trained["w"])  # loaded
    np.testing.assert_array_equal(started["b"], np.zeros(3))  # hk.Linear's fresh bias


@pytest.mark.slow
def test_fine_tuning_from_weights_of_another_shape_fails_before_training(tmp_path):
    _train_source(str(tmp_path / "source"), num_classes=5)
    config = fakes.fake_config(**{"train.steps": 1})
    experiment = fakes.fake_experiment(config, fakes.FakeData(num_classes=3))
    source = checkpointing.read_params(str(tmp_path / "source"))
    experiment.initial_params = lambda fresh: weights.merge_pretrained(source, fresh, exclude=[r"/b$"])
    with pytest.raises(weights.ParamsMismatchError, match=r"wrong shape: fake_net/~/linear/w"):
        loop.run(experiment, str(tmp_path / "finetune"))
    assert not list((tmp_path / "finetune" / "checkpoints").glob("[0-9]*"))


def test_wrong_weights_are_refused_when_the_experiment_is_built(tmp_path):
    # Regression: the names and shapes of `init_from` weights were only checked inside the loop,
    # after the params were initialised, and the error escaped train.py as a traceback. Now
    # build_experiment (inside train.py's one-message error handler) refuses them at the door.
    from nfnets_jax.train import builder, config_files  # pylint: disable=import-outside-toplevel

    config = config_files.load_config(str(REPO / "configs" / "digits.py"))
    bad = {"NFNet/~/linear": {"w": np.zeros((3, 10), np.float32), "b": np.zeros(10, np.float32)}}
    weights.save_npz(str(tmp_path / "bad.npz"), bad)
    config.checkpoint.init_from = str(tmp_path / "bad.npz")
    with pytest.raises(weights.ParamsMismatchError, match="missing"):
        builder.build_experiment(config)
