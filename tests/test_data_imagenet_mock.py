"""The pipelines on the real `imagenet2012` TFDS builder with `tfds.testing.mock_data`.

The mock serves N deterministic JPEG examples and honours absolute split slicing, so process
shards can be checked for disjointness and completeness. Example i has label i and a flat
colour, so every output can be traced to its source example. Nothing is downloaded.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nfnets_jax.data import config as data_config_lib
from nfnets_jax.data import pipeline
from nfnets_jax.data.sources import DatasetUnavailableError, IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB

NUM_EXAMPLES = 37  # divides neither the batch sizes nor the process count
IMAGE_SIZE = 32


def _example_image(index: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    height, width = 40 + 7 * (index % 5), 44 + 5 * (index % 7)
    return np.broadcast_to(rng.integers(30, 220, size=3, dtype=np.uint8),
                           (height, width, 3)).copy()


_JPEGS = None
_CORRUPT = set()  # indices served as undecodable bytes


def _mock_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    global _JPEGS
    del self, decoders, read_config, shuffle_files
    if _JPEGS is None:
        _JPEGS = [tf.io.encode_jpeg(_example_image(i), quality=95).numpy()
                  for i in range(NUM_EXAMPLES)]
    jpegs = [b"\xff\xd8 truncated, not a JPEG" if i in _CORRUPT else jpeg
             for i, jpeg in enumerate(_JPEGS)]
    instruction = split if isinstance(split, tfds.core.ReadInstruction) else \
        tfds.core.ReadInstruction.from_spec(split)
    name = instruction.split_name
    (absolute,) = instruction.to_absolute(
        {name: tfds.core.SplitInfo(name=name, shard_lengths=[NUM_EXAMPLES], num_bytes=0)})
    indices = list(range(absolute.from_ or 0,
                         NUM_EXAMPLES if absolute.to is None else absolute.to))
    return tf.data.Dataset.from_tensor_slices({
        "image": tf.constant([jpegs[i] for i in indices] or [b""])[:len(indices)],
        "label": tf.constant(indices, tf.int64),
        "file_name": tf.constant([f"{i}.JPEG" for i in indices] or [""])[:len(indices)]})


@pytest.fixture()
def mock_imagenet():
    with tfds.testing.mock_data(as_dataset_fn=_mock_as_dataset):
        yield


@pytest.fixture()
def mock_imagenet_with_corrupt_images():
    _CORRUPT.update({3, 20})
    try:
        with tfds.testing.mock_data(as_dataset_fn=_mock_as_dataset):
            yield
    finally:
        _CORRUPT.clear()


def _config(**augment):
    config = data_config_lib.default_data_config()
    config.name = "imagenet2012"
    config.image_size = IMAGE_SIZE
    config.eval_image_size = IMAGE_SIZE
    config.shuffle_buffer = 16
    config.num_parallel_calls = 2
    config.threads = 2
    config.prefetch = 1
    for key, value in augment.items():
        config.augment[key] = value
    return config


def _denormalize(images):
    return images * np.array(IMAGENET_STDDEV_RGB) + np.array(IMAGENET_MEAN_RGB)


def test_dataset_info(mock_imagenet):
    info = pipeline.dataset_info(_config())
    assert info == (1000, NUM_EXAMPLES, NUM_EXAMPLES)


@pytest.mark.slow
def test_train_batches_shapes_dtypes_ranges_and_determinism(mock_imagenet):
    config = _config(randaugment_magnitude=10)
    kwargs = dict(global_batch_size=8, seed=3, process_index=0, process_count=1,
                  local_device_count=2)
    batches = [next(iterator) for iterator in
               [pipeline.make_train_iterator(config, **kwargs)] for _ in range(3)]
    first = batches[0]
    assert first["images"].shape == (2, 4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert first["images"].dtype == np.float32
    assert first["labels"].dtype == first["mix_labels"].dtype == np.int32
    assert first["labels"].shape == first["ratio"].shape == (2, 4)
    assert first["ratio"].dtype == np.float32
    for batch in batches:
        pixels = _denormalize(batch["images"])  # RandAugment clips to uint8 before normalising
        assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
        assert np.all((batch["ratio"] >= 0) & (batch["ratio"] <= 1))
        assert np.all((batch["labels"] >= 0) & (batch["labels"] < NUM_EXAMPLES))
    # Same seed -> same batches; another seed -> others.
    again = pipeline.make_train_iterator(config, **kwargs)
    for batch in batches:
        other = next(again)
        for key in batch:
            np.testing.assert_array_equal(batch[key], other[key])
    different = next(pipeline.make_train_iterator(config, **{**kwargs, "seed": 4}))
    assert not np.array_equal(different["images"], first["images"])


@pytest.mark.slow
def test_resume_from_start_step_equals_the_fresh_stream(mock_imagenet):
    # 8 outputs from 16 inputs per step: an epoch of 37 examples ends mid-step, so the resumed
    # stream must also cross epochs and segments exactly like the fresh one.
    config = _config(randaugment_layers=1)
    kwargs = dict(global_batch_size=8, seed=0, process_index=0, process_count=1,
                  local_device_count=1)
    fresh = pipeline.make_train_iterator(config, **kwargs)
    expected = [next(fresh) for _ in range(6)]
    resumed = pipeline.make_train_iterator(config, start_step=4, **kwargs)
    for batch in expected[4:]:
        got = next(resumed)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])


_NUM_FILES = 4


def _mock_as_dataset_with_file_shuffling(self, split, decoders=None, read_config=None,
                                         shuffle_files=False):
    """Like `_mock_as_dataset`, but read from 4 "files" shuffled as TFDS's reader does.

    tensorflow_datasets/core/reader.py: `instruction_ds.shuffle(len(files),
    seed=read_config.shuffle_seed, reshuffle_each_iteration=
    read_config.shuffle_reshuffle_each_iteration)` when shuffle_files, then the files' records.
    """
    examples = _mock_as_dataset(self, split, decoders, read_config, False)
    count = int(examples.cardinality())
    bounds = np.linspace(0, count, _NUM_FILES + 1).astype(np.int64)
    files = tf.data.Dataset.from_tensor_slices((bounds[:-1], bounds[1:]))
    if shuffle_files:
        files = files.shuffle(_NUM_FILES, seed=read_config.shuffle_seed,
                              reshuffle_each_iteration=read_config.shuffle_reshuffle_each_iteration)
    return files.flat_map(lambda start, end: examples.skip(start).take(end - start))


def test_resume_equals_the_fresh_stream_with_tfds_file_shuffling():
    # Regression: TFDS reshuffles its files on every iteration unless told not to; the train
    # stream iterates the files once per epoch, so a stream resumed in epoch 2 read the files in
    # another order than the fresh stream did in its epoch 2.
    config = _config(mix="none", randaugment_layers=0)
    config.shuffle_buffer = 4
    kwargs = dict(global_batch_size=6, seed=0, process_index=0, process_count=1,
                  local_device_count=1)
    with tfds.testing.mock_data(as_dataset_fn=_mock_as_dataset_with_file_shuffling):
        fresh = pipeline.make_train_iterator(config, **kwargs)
        expected = [next(fresh)["labels"] for _ in range(15)]  # 90 examples: into epoch 3
        resumed = pipeline.make_train_iterator(config, start_step=13, **kwargs)
        np.testing.assert_array_equal([next(resumed)["labels"] for _ in range(2)], expected[13:])
    first_epoch = np.concatenate(expected).ravel()[:NUM_EXAMPLES]
    assert sorted(first_epoch) == list(range(NUM_EXAMPLES))


def test_train_epoch_sees_every_example_of_the_shard(mock_imagenet):
    # No mixing, 3 examples per process and step: the first 19 (process 0) or 18 (process 1)
    # labels are one epoch, a permutation of the shard; the next epoch is another order.
    config = _config(mix="none", randaugment_layers=0)
    labels = []
    for process in range(2):
        iterator = pipeline.make_train_iterator(config, global_batch_size=6, seed=1,
                                                process_index=process, process_count=2,
                                                local_device_count=1)
        start, end = pipeline.process_range(NUM_EXAMPLES, process, 2)
        stream = np.concatenate([next(iterator)["labels"].ravel() for _ in range(13)])
        epochs = stream[:end - start], stream[end - start:2 * (end - start)]
        for epoch in epochs:
            assert sorted(epoch) == list(range(start, end))
        assert not np.array_equal(epochs[0], epochs[1])
        labels.append(set(epochs[0]))
    assert not labels[0] & labels[1] and len(labels[0] | labels[1]) == NUM_EXAMPLES


def test_eval_two_processes_every_example_once_with_geometry(mock_imagenet):
    config = _config()
    seen, steps = [], []
    for process in range(2):
        batches = list(pipeline.make_eval_iterator(config, global_batch_size=8,
                                                   process_index=process, process_count=2,
                                                   local_device_count=2))
        steps.append(len(batches))
        for batch in batches:
            assert batch["images"].shape == (2, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
            assert batch["mask"].dtype == np.float32
            np.testing.assert_array_equal(batch["ratio"], np.ones((2, 2), np.float32))
            real = batch["mask"].ravel() == 1
            seen.extend(batch["labels"].ravel()[real])
            pixels = _denormalize(batch["images"]).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)
            for label, image in zip(batch["labels"].ravel()[real], pixels[real]):
                # A flat image stays flat under squash + centre crop: the example's colour.
                colour = _example_image(int(label))[0, 0].astype(np.float32)
                np.testing.assert_allclose(image.reshape(-1, 3).mean(0), colour, atol=3.0)
    assert steps[0] == steps[1] == int(np.ceil(19 / 4))  # lockstep: the larger shard decides
    assert sorted(seen) == list(range(NUM_EXAMPLES))


def test_global_batch_must_divide_over_processes_and_devices(mock_imagenet):
    with pytest.raises(ValueError, match="does not divide over 2 process"):
        pipeline.make_train_iterator(_config(), global_batch_size=6, seed=0, process_index=0,
                                     process_count=2, local_device_count=2)
    with pytest.raises(ValueError, match="per-device batch must be even"):
        pipeline.make_train_iterator(_config(), global_batch_size=4, seed=0, process_index=0,
                                     process_count=1, local_device_count=4)


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
    config = _config()
    config.data_dir = str(tmp_path)  # empty: nothing prepared, no manual tars
    with pytest.raises(DatasetUnavailableError) as error:
        pipeline.dataset_info(config)
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert str(tmp_path / "downloads" / "manual") in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded or written


def test_unknown_dataset_name_is_a_clear_error(tmp_path):
    config = _config()
    config.name = "no_such_dataset_xyz"
    config.data_dir = str(tmp_path)
    with pytest.raises(DatasetUnavailableError, match="Unknown dataset 'no_such_dataset_xyz'"):
        pipeline.dataset_info(config)


def test_undecodable_images_are_skipped_and_logged(mock_imagenet_with_corrupt_images, caplog):
    config = _config(mix="none", randaugment_layers=0)
    iterator = pipeline.make_train_iterator(config, global_batch_size=5, seed=0, process_index=0,
                                            process_count=1, local_device_count=1)
    labels = np.concatenate([next(iterator)["labels"].ravel() for _ in range(7)])  # 35 of 37
    assert sorted(labels) == sorted(set(range(NUM_EXAMPLES)) - {3, 20})
    assert "skipped 2 undecodable image(s)" in caplog.text
    evaluated = []
    for batch in pipeline.make_eval_iterator(config, global_batch_size=8, process_index=0,
                                             process_count=1, local_device_count=2):
        evaluated.extend(batch["labels"].ravel()[batch["mask"].ravel() == 1])
    assert sorted(evaluated) == sorted(set(range(NUM_EXAMPLES)) - {3, 20})
    assert "skipped 2 undecodable image(s) of 37" in caplog.text


@pytest.mark.slow
def test_augment_before_mix_mixes_normalised_images(mock_imagenet):
    # RandAugment + normalisation per example first, then MixUp of pairs: outputs are convex
    # combinations of normalised, clipped images, so they stay within the normalised range.
    config = _config(mix="mixup", augment_before_mix=True, randaugment_layers=2)
    batch = next(pipeline.make_train_iterator(config, global_batch_size=4, seed=0,
                                              process_index=0, process_count=1,
                                              local_device_count=1))
    assert batch["images"].shape == (1, 4, IMAGE_SIZE, IMAGE_SIZE, 3)
    pixels = _denormalize(batch["images"])
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    assert np.all((batch["ratio"] >= 0) & (batch["ratio"] <= 1))
    assert not np.array_equal(batch["labels"], batch["mix_labels"])
