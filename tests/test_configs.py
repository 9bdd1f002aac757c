"""Every config loads, locks, validates and carries the paper's recipe (paper Table 1, App. A).

Expected values are typed in from the paper's tables, not read from the code.
"""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from nfnets_jax import models, optim
from nfnets_jax.train import config_schema
from nfnets_jax.models import make_forward

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
IMAGENET_TRAIN = 1_281_167

# paper Table 1 (and official `base.py:nfnet_params` for F7): train px, test px, dropout, RA magnitude.
NFNET_TABLE = {
    "F0": (192, 256, 0.2, 5), "F1": (224, 320, 0.3, 10), "F2": (256, 352, 0.4, 10),
    "F3": (320, 416, 0.4, 15), "F4": (384, 512, 0.5, 15), "F5": (416, 544, 0.5, 15),
    "F6": (448, 576, 0.5, 15), "F7": (480, 608, 0.5, 15),
}
CONFIG_ARGS = {
    "nfnet": list(NFNET_TABLE) + ["F5-sam", "F6-sam"],
    "nf_resnet": ["50", "101", "200", "se50"],
    "nf_regnet": [f"B{k}" for k in range(9)],
    "bn_resnet": ["50", "152"],
    "agc_ablation": ["batch=256,clipping=0.16", "batch=4096,clipping=0.01,depth=200", "batch=1024,clipping=0"],
    "finetune": ["F0", "F6"],
    "cifar10": [None],
    "digits": [None],
    "fashion_mnist": [None],
}


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIG_ARGS.items() for a in args])
def test_config_validates(name, arg):
    _, config = load(name, arg)
    config_schema.validate_config(config, device_count=8)


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_docstring_opens_with_its_launch_command_hardware_and_expected_result(name):
    module, _ = load(name, CONFIG_ARGS[name][0])
    lines = [line.strip() for line in module.__doc__.strip().splitlines() if line.strip()]
    command = next(line for line in lines if line.startswith("python"))
    assert command.startswith("python -m experiments.train")
    assert name == "digits" or f"--config=configs/{name}.py" in command
    assert lines.index(command) <= 2  # the command comes right after the one-line summary
    assert re.search(r"^Hardware:", module.__doc__, re.M)
    assert re.search(r"^Expected", module.__doc__, re.M)


@pytest.mark.parametrize("variant", sorted(NFNET_TABLE))
def test_nfnet_configs_carry_the_paper_recipe(variant):
    train_px, test_px, dropout, magnitude = NFNET_TABLE[variant]
    _, config = load("nfnet", variant)
    assert config.model.name == f"nfnet_{variant.lower()}"
    assert (config.data.image_size, config.data.eval_image_size) == (train_px, test_px)
    assert config.model.kwargs.drop_rate == dropout
    assert config.model.kwargs.stochdepth_rate == 0.25
    assert (config.data.augment.randaugment_layers, config.data.augment.randaugment_magnitude) == (4, magnitude)
    assert config.data.augment.mix == "mixup_cutmix" and config.data.augment.mixup_alpha == 0.2
    assert config.train.batch_size == 4096 and config.train.epochs == 360
    opt = config.optimizer
    assert (opt.name, opt.momentum, opt.nesterov) == ("sgd", 0.9, True)
    assert (opt.lr, opt.lr_scale_by_batch, opt.warmup_epochs, opt.schedule, opt.min_lr) == (0.1, True, 5, "cosine", 0)
    assert opt.weight_decay == 2e-5 and opt.agc.clipping == 0.01 and opt.agc.eps == 1e-3
    assert opt.ema_decay == 0.99999 and not opt.sam.rho
    assert config.loss.label_smoothing == 0.1 and config.precision.compute_dtype == "bfloat16"
    # 360 epochs of ImageNet at batch 4096 is the official 112,602 steps (integer division).
    assert config_schema.total_train_steps(config, IMAGENET_TRAIN) == 112_602


def test_nfnet_learning_rate_peaks_at_1_6_after_five_epochs_and_decays_to_zero():
    _, config = load("nfnet", "F0")
    steps_per_epoch = IMAGENET_TRAIN / 4096
    total = config_schema.total_train_steps(config, IMAGENET_TRAIN)
    schedule = optim.make_lr_schedule(config.optimizer, steps_per_epoch=steps_per_epoch,
                                      total_steps=total, batch_size=4096)
    assert float(schedule(0)) == 0.0
    assert float(schedule(int(5 * steps_per_epoch))) == pytest.approx(1.6, rel=1e-3)
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("variant", ["F5-sam", "F6-sam"])
def test_sam_variants_ascend_on_a_fifth_of_each_device_batch_unsynced(variant):
    _, config = load("nfnet", variant)
    assert config.optimizer.sam.rho == 0.05
    assert config.optimizer.sam.ascent_fraction == 0.2 and config.optimizer.sam.sync_ascent is False


def test_finetune_config_is_the_paper_recipe():
    _, config = load("finetune", "F0")  # paper App. A.5
    assert config.train.steps == 15_000 and config.train.batch_size == 2048
    assert config.optimizer.lr == 0.1 and not config.optimizer.lr_scale_by_batch
    assert config.train.warmup_steps == 5000 and config.optimizer.schedule == "cosine"
    assert config.optimizer.sam.rho == 0.05 and config.optimizer.weight_decay == 1e-5
    assert config.model.kwargs.drop_rate == 0.25 and config.model.kwargs.stochdepth_rate == 0.1


def test_f0_config_builds_the_official_71_5m_parameter_model_and_the_finetune_head_regex():
    _, config = load("finetune", "F0")
    forward = make_forward(config.model.name, 1000, config.model.kwargs.to_dict())
    params, _ = jax.eval_shape(lambda: forward.init(jax.random.PRNGKey(0), jnp.zeros((1, 192, 192, 3)), True))
    assert models.count_params(params) == 71_489_284  # tests/data/official_nfnet_facts.json
    paths = [f"{module}/{leaf}" for module, leaves in params.items() for leaf in leaves]
    head = [p for p in paths if any(re.search(r, p) for r in config.checkpoint.init_exclude)]
    assert sorted(head) == ["NFNet/~/linear/b", "NFNet/~/linear/w"]


def test_agc_ablation_covers_the_paper_grid_one_run_per_point():
    module, _ = load("agc_ablation", None)
    assert len(module.GRID) == 25
    assert {b for b, _ in module.GRID} == {256, 512, 1024, 2048, 4096}
    assert {c for _, c in module.GRID} == {0.01, 0.02, 0.04, 0.08, 0.16}
    config = module.get_config("batch=512,clipping=0.08")
    assert config.train.batch_size == 512 and config.optimizer.agc.clipping == 0.08
    assert config.train.epochs == 90 and config.optimizer.lr == 0.1 and config.optimizer.lr_scale_by_batch
    with pytest.raises(ValueError, match="grid"):
        module.get_config("batch=300,clipping=0.01")


def _parse(argv):
    """`--config...` flags as experiments/train.py parses them (locked; default: the demo)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", str(CONFIGS / "digits.py"), flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_misspelt_override_fails_because_the_config_is_locked():
    assert _parse(["prog", "--config.optimizer.agc.clipping=0.02"]).optimizer.agc.clipping == 0.02
    with pytest.raises(Exception, match="cliping"):
        _parse(["prog", "--config.optimizer.agc.cliping=0.02"])


def test_odd_per_device_batch_with_mixup_cutmix_is_refused_at_the_door():
    # Regression: this was only caught when the train iterator was built, inside the loop after
    # the params were initialised, and reached the user as a traceback.
    _, config = load("nfnet", "F0")
    config.train.batch_size = 24
    with pytest.raises(ValueError, match="batch_size=24 gives 3 on each of 8 devices"):
        config_schema.validate_config(config, device_count=8)
    config.data.augment.mix = "mixup"
    config_schema.validate_config(config, device_count=8)


def test_evaluation_is_not_refused_for_a_training_batch_it_never_builds():
    # Regression: `experiments.eval --variant=F0` on 6 GPUs was refused because the training
    # batch (4096) does not divide by 6, with no flag to change it.
    _, config = load("nfnet", "F0")
    config.eval.batch_size = 1020
    with pytest.raises(ValueError, match="train.batch_size=4096"):
        config_schema.validate_config(config, device_count=6)
    config_schema.validate_config(config, device_count=6, training=False)


def test_validation_names_the_field_and_the_fix():
    _, config = load("digits")
    config.model.name = "nfnet_f99"
    config.train.batch_size = 6
    config.parallel.backend = "pjit"
    with pytest.raises(ValueError) as error:
        config_schema.validate_config(config, device_count=4)
    message = str(error.value)
    assert "nfnet_f99" in message and "nfnet_f0" in message
    assert "batch_size=6" in message and "multiple of the 4 devices" in message
    assert "pjit" in message and "shard_map" in message


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_docstring_command_and_every_optional_field_parse_as_command_line_overrides(name):
    # Regression: fields left None (data.data_dir, optimizer.sam.rho, agc.clipping in configs
    # without AGC, ema_decay without EMA) could not be overridden at all: config_flags refused
    # `--config.data.data_dir=...`, the flag of every ImageNet launch command.
    module, _ = load(name, CONFIG_ARGS[name][0])
    command = module.__doc__.split("python -m experiments.train", 1)[1].split("\n\n")[0]
    config_args = [a for a in command.replace("\\\n", " ").split() if a.startswith("--config")]
    if not any(a.startswith("--config=") for a in config_args):  # the demo: the default config
        config_args.insert(0, f"--config={CONFIGS / 'digits.py'}")
    config_args = [a.replace("--config=configs/", f"--config={CONFIGS}/") for a in config_args]
    _parse(["prog", *config_args])
    spec = config_args[0].split("=", 1)[1]
    values = {"data.data_dir": "gs://bucket/tfds", "optimizer.agc.clipping": 0.02,
              "optimizer.sam.rho": 0.05, "optimizer.ema_decay": 0.9999, "train.steps": 7,
              "train.warmup_steps": 3, "checkpoint.init_from": "/weights.npz"}
    assert set(values) == set(config_schema.OPTIONAL_FIELDS)
    config = _parse(["prog", f"--config={spec}", *[f"--config.{k}={v}" for k, v in values.items()]])
    for path, value in values.items():
        section, leaf = path.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node[part]
        assert node[leaf] == value, path
    config_schema.validate_config(config, device_count=1)


@pytest.mark.parametrize("ema_decay,expected", [(0.0, None), (None, None), (0.99999, 0.99999)])
def test_ema_is_switched_off_by_zero_as_well_as_none(ema_decay, expected):
    """None cannot be typed on the command line, so `--config.optimizer.ema_decay=0` must mean off."""
    from nfnets_jax.train import builder

    _, config = load("digits")
    config.optimizer.ema_decay = ema_decay
    opt_config = optim.validate_optimizer_config(config.optimizer)
    settings = builder.step_settings_from_config(config, opt_config, num_classes=10, agc_groups={})
    assert settings.ema_decay == expected
