"""The training stream of random-access sources does not depend on the process layout.

The global batch at step s (all processes' batches, in process order) is the same for 1 process
x 4 devices, 2 x 2 and 4 x 1, and a stream started at step k under one layout continues the
stream of another: a run can resume on a different number of hosts. The expectation is the
single-process stream itself; the multi-process streams are built independently per process.
"""

import logging

import numpy as np
import pytest

from nfnets_jax.data import config as data_config_lib
from nfnets_jax.data import pipeline

STEPS = 4
GLOBAL_BATCH = 16


def _global_batches(config, *, processes, local_devices, start_step=0, steps=STEPS, seed=3):
    """The global batches of steps start_step.., concatenated over processes in process order."""
    streams = [pipeline.make_train_iterator(config, global_batch_size=GLOBAL_BATCH, seed=seed,
                                            start_step=start_step, process_index=p,
                                            process_count=processes, local_device_count=local_devices)
               for p in range(processes)]
    batches = []
    for _ in range(steps):
        parts = [next(stream) for stream in streams]
        # [local_devices, B, ...] per process -> [global_devices, B, ...]
        batches.append({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
    return batches


def _assert_same(got, expected):
    for got_batch, expected_batch in zip(got, expected, strict=True):
        assert got_batch.keys() == expected_batch.keys()
        for key in expected_batch:
            np.testing.assert_array_equal(got_batch[key], expected_batch[key], err_msg=key)


def _digits(mix="none"):
    config = data_config_lib.digits_data_config()
    config.augment.mix = mix
    return config


@pytest.mark.parametrize("processes,local_devices", [(2, 2), (4, 1)])
def test_global_batch_is_the_same_for_any_split_of_four_devices(processes, local_devices, caplog):
    config = _digits()
    expected = _global_batches(config, processes=1, local_devices=4)
    with caplog.at_level(logging.WARNING):
        _assert_same(_global_batches(config, processes=processes, local_devices=local_devices), expected)
    # Every digit decodes: no process may count the other processes' chunks as skipped images.
    assert "undecodable" not in caplog.text, caplog.text


def test_with_mixing_the_global_batch_is_the_same_for_the_same_device_count():
    config = _digits(mix="mixup")
    expected = _global_batches(config, processes=1, local_devices=4, steps=2)
    got = _global_batches(config, processes=2, local_devices=2, steps=2)
    _assert_same(got, expected)
    assert not np.all(expected[0]["ratio"] == 1.0)  # really mixed


def test_without_mixing_the_examples_do_not_depend_on_the_device_count():
    config = _digits()
    one_device = _global_batches(config, processes=1, local_devices=1)
    four_devices = _global_batches(config, processes=2, local_devices=2)
    for single, multi in zip(one_device, four_devices):
        for key in single:
            np.testing.assert_array_equal(single[key].reshape(-1, *single[key].shape[2:]),
                                          multi[key].reshape(-1, *multi[key].shape[2:]), err_msg=key)


@pytest.mark.slow  # over ~3 s on 2 cores: not in the `-m "not slow"` inner loop
def test_resume_on_another_number_of_processes_continues_the_stream():
    config = _digits()
    fresh = _global_batches(config, processes=2, local_devices=2, steps=6)
    resumed = _global_batches(config, processes=1, local_devices=4, start_step=4, steps=2)
    _assert_same(resumed, fresh[4:])
    # Across an epoch boundary (1437 examples: epoch 1 starts inside step 89).
    _assert_same(_global_batches(config, processes=1, local_devices=4, start_step=89, steps=2),
                 _global_batches(config, processes=4, local_devices=1, start_step=89, steps=2))
