"""The offline demo source: scikit-learn digits, resized to RGB, fixed stratified split."""

import numpy as np
import pytest
from sklearn import datasets

from nfnets_jax.data import config as data_config_lib
from nfnets_jax.data import pipeline
from nfnets_jax.data.sources import load_digits_arrays


def test_sizes_values_and_fixed_stratified_split():
    arrays = load_digits_arrays(32, 0.2, 0)
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["test"]
    assert len(train_labels) + len(test_labels) == 1797
    assert len(test_labels) == int(np.ceil(0.2 * 1797))  # sklearn rounds the test size up
    assert train_images.shape == (len(train_labels), 32, 32, 3) and train_images.dtype == np.uint8
    assert train_images.max() == 255 and train_images.min() == 0
    np.testing.assert_array_equal(train_images[..., 0], train_images[..., 2])  # grey as RGB
    # Stratified: each class's share of the test split matches its share of the data set.
    all_counts = np.bincount(datasets.load_digits().target, minlength=10)
    test_counts = np.bincount(test_labels, minlength=10)
    np.testing.assert_allclose(test_counts, 0.2 * all_counts, atol=1.0)
    # Fixed: the same split on every call (different seed -> different split).
    again = load_digits_arrays(32, 0.2, 0)
    np.testing.assert_array_equal(again["test"][1], test_labels)
    other = load_digits_arrays(32, 0.2, 1)
    assert not np.array_equal(other["test"][0], test_images)


def test_resized_images_keep_the_digit():
    # Sampling the 32x32 image at the centres of its 4x4 blocks gives back (about) the 8x8
    # original x 255/16: the nearest original digit is an exact match with the same label.
    digits = datasets.load_digits()
    train_images, train_labels = load_digits_arrays(32, 0.2, 0)["train"]
    centres = train_images[:60, 1::4, 1::4, 0].astype(np.float32) / 2 \
        + train_images[:60, 2::4, 2::4, 0].astype(np.float32) / 2
    pooled = centres * 16 / 255
    distances = np.abs(pooled[:, None] - digits.images[None]).max(axis=(2, 3))
    nearest = distances.argmin(axis=1)
    np.testing.assert_array_equal(digits.target[nearest], train_labels[:60])
    assert distances.min(axis=1).max() < 4.0  # bilinear smoothing only


def test_digits_batches_are_normalised_and_unflipped():
    config = data_config_lib.digits_data_config()
    info = pipeline.dataset_info(config)
    assert info == (10, 1437, 360)
    iterator = pipeline.make_train_iterator(config, global_batch_size=32, seed=0,
                                            process_index=0, process_count=1,
                                            local_device_count=2)
    batch = next(iterator)
    assert batch["images"].shape == (2, 16, 32, 32, 3)
    np.testing.assert_array_equal(batch["ratio"], 1.0)
    np.testing.assert_array_equal(batch["mix_labels"], batch["labels"])
    images = np.concatenate([next(iterator)["images"] for _ in range(20)]).reshape(-1, 32, 32, 3)
    assert images.mean() == pytest.approx(0.0, abs=0.15)  # train-pixel mean/std normalisation
    assert images.std() == pytest.approx(1.0, abs=0.15)
    eval_batches = list(pipeline.make_eval_iterator(config, global_batch_size=64,
                                                    process_index=0, process_count=1,
                                                    local_device_count=2))
    assert sum(b["mask"].sum() for b in eval_batches) == 360
    test_images, test_labels = load_digits_arrays(32, 0.2, 0)["test"]
    first = eval_batches[0]["images"][0, 0]
    train_pixels = load_digits_arrays(32, 0.2, 0)["train"][0].astype(np.float64)
    expected = (test_images[0] - train_pixels.mean()) / train_pixels.std()
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)  # eval: no augmentation
    assert eval_batches[0]["labels"][0, 0] == test_labels[0]


@pytest.mark.slow
def test_train_shift_is_a_translation_not_a_flip():
    config = data_config_lib.digits_data_config()
    config.digits.max_shift = 2
    batch = next(pipeline.make_train_iterator(config, global_batch_size=16, seed=5,
                                              process_index=0, process_count=1,
                                              local_device_count=1))
    arrays = load_digits_arrays(32, 0.2, 0)
    train_images = arrays["train"][0].astype(np.float64)
    mean, std = train_images.mean(), train_images.std()
    for image in batch["images"][0]:
        pixels = np.round(image[..., 0] * std + mean)
        # Find the source image and shift (dy, dx) in [-2, 2]^2 that reproduce it exactly.
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = np.pad(train_images[..., 0], ((0, 0), (2, 2), (2, 2)))
                window = padded[:, 2 + dy:34 + dy, 2 + dx:34 + dx]
                if np.any(np.all(np.abs(window - pixels) < 0.5, axis=(1, 2))):
                    found = True
        assert found


def test_resume_from_start_step_equals_the_fresh_stream():
    config = data_config_lib.digits_data_config()
    kwargs = dict(global_batch_size=400, seed=2, process_index=0, process_count=1,
                  local_device_count=2)  # 1437 examples: epochs end mid-step
    fresh = pipeline.make_train_iterator(config, **kwargs)
    expected = [next(fresh) for _ in range(5)]
    resumed = pipeline.make_train_iterator(config, start_step=3, **kwargs)
    for batch in expected[3:]:
        got = next(resumed)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])
