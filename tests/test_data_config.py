"""config.data defaults and validation; the batch layout and process slices."""

import numpy as np
import pytest

from nfnets_jax.data import config as data_config_lib
from nfnets_jax.data import pipeline


def test_defaults_are_the_nfnet_f0_recipe():
    config = data_config_lib.default_data_config()
    data_config_lib.validate_data_config(config)
    # official `experiment_nfnets.py:get_config`: F0 trains at 192 px, tests at 256 px, RA 4x5 after
    # MixUp(0.2)+CutMix, squash-resize evaluation.
    assert (config.name, config.train_split, config.eval_split) == (
        "imagenet2012", "train", "validation")
    assert (config.image_size, config.eval_image_size) == (192, 256)
    assert config.eval_preprocess == "resize_crop_32"
    augment = config.augment
    assert (augment.randaugment_layers, augment.randaugment_magnitude) == (4, 5)
    assert (augment.mixup_alpha, augment.mix, augment.augment_before_mix) == (
        0.2, "mixup_cutmix", False)
    data_config_lib.validate_data_config(data_config_lib.digits_data_config())


@pytest.mark.parametrize("field, value, message", [
    ("eval_preprocess", "squash", "eval_preprocess='squash'"),
    ("image_size", 0, "image_size=0"),
    ("augment.mix", "cutmix_mixup", "augment.mix='cutmix_mixup'"),
    ("augment.randaugment_layers", -1, "randaugment_layers"),
    ("augment.mixup_alpha", 0.0, "mixup_alpha"),
    ("num_parallel_calls", 0, "num_parallel_calls"),
])
def test_bad_fields_fail_with_the_field_name(field, value, message):
    config = data_config_lib.default_data_config()
    parent, _, leaf = field.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        data_config_lib.validate_data_config(config)


def test_digits_split_names_are_checked():
    config = data_config_lib.digits_data_config()
    config.eval_split = "validation"
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        data_config_lib.validate_data_config(config)


def test_batch_layout_divides_or_explains():
    layout = pipeline.batch_layout(4096, process_index=3, process_count=4, local_device_count=8)
    assert (layout.local_batch_size, layout.per_device_batch_size) == (1024, 128)
    with pytest.raises(ValueError, match=r"4 process\(es\) x 8 local device\(s\) = 32 devices"):
        pipeline.batch_layout(4100, process_index=0, process_count=4, local_device_count=8)
    with pytest.raises(ValueError, match="process_index=4"):
        pipeline.batch_layout(64, process_index=4, process_count=4, local_device_count=1)


@pytest.mark.parametrize("num_examples, count", [(50_000, 3), (37, 2), (5, 8), (1_281_167, 64)])
def test_process_ranges_are_np_array_split(num_examples, count):
    chunks = np.array_split(np.arange(num_examples), count)
    for index, chunk in enumerate(chunks):
        start, end = pipeline.process_range(num_examples, index, count)
        assert (start, end) == ((chunk[0], chunk[-1] + 1) if len(chunk) else (start, start))


def test_eval_steps_cover_the_largest_shard():
    layout = pipeline.batch_layout(8, process_index=0, process_count=2, local_device_count=2)
    assert pipeline.num_eval_steps(37, layout) == 5  # shards 19 and 18, 4 per process-step


@pytest.mark.slow
def test_input_benchmark_smoke(capsys):
    """Smoke test: the benchmark command runs end to end and prints one JSON line."""
    import json

    from experiments import input_benchmark
    result = input_benchmark.main(["--batch_size=4", "--steps=1", "--warmup_steps=0",
                                   "--config.data.image_size=32", "--height=48", "--width=64"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == result and result["images_per_s_per_core"] > 0
    assert result["image_size"] == 32 and result["config"].endswith("configs/nfnet.py:F0")
    assert result["provenance"]["versions"]["tensorflow-datasets"]  # what produced the number
