"""The synthetic source: deterministic, sized as configured, labels tied to images."""

import numpy as np
import pytest
import tensorflow as tf

from nfnets_jax.data import config as data_config_lib
from nfnets_jax.data import pipeline
from nfnets_jax.data.sources import synthetic_source


def _synthetic_config():
    config = data_config_lib.default_data_config()
    config.name = "synthetic"
    config.synthetic.update(num_classes=10, num_train_examples=100, num_eval_examples=30,
                            height=40, width=48)
    return config


def test_synthetic_examples_are_deterministic_jpegs():
    config = _synthetic_config()
    source = synthetic_source(config.synthetic)
    assert source.encoded and source.num_classes == 10
    assert source.split_size("train") == 100 and source.split_size("validation") == 30
    first = list(source.read("train", 0, 70, None).as_numpy_iterator())
    again = list(synthetic_source(config.synthetic).read("train", 0, 70, None)
                 .as_numpy_iterator())
    for a, b in zip(first, again):
        assert a["image"] == b["image"] and a["label"] == b["label"]
    decoded = tf.io.decode_jpeg(first[0]["image"]).numpy()
    assert decoded.shape == (40, 48, 3)
    # Example i shows pool image i % 64 and has label (i % 64) % 10.
    assert first[64]["image"] == first[0]["image"]
    np.testing.assert_array_equal([ex["label"] for ex in first],
                                  [(i % 64) % 10 for i in range(70)])


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_synthetic_train_and_eval_run():
    config = _synthetic_config()
    config.image_size = config.eval_image_size = 24
    config.augment.randaugment_layers = 1
    batch = next(pipeline.make_train_iterator(config, global_batch_size=4, seed=0,
                                              process_index=0, process_count=1,
                                              local_device_count=2))
    assert batch["images"].shape == (2, 2, 24, 24, 3)
    batches = list(pipeline.make_eval_iterator(config, global_batch_size=8, process_index=1,
                                               process_count=2, local_device_count=2))
    assert sum(b["mask"].sum() for b in batches) == 15
