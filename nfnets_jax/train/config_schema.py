"""The one config schema every experiment shares (docs/CONTRACTS.md), and its checks at the door.

`base_config()` is what `configs/*.py` start from; each file changes only what its recipe
changes. `config_flags` locks the result, so a misspelt `--config.a.b=...` override fails instead
of being ignored. `validate_config` runs before any dataset is opened or any array is built, and
names the field and the fix for every mistake a user can make in it.
"""

from __future__ import annotations

import os
import pathlib

import ml_collections
from ml_collections import config_dict

from nfnets_jax.data import config as data_config_lib
from nfnets_jax.optim import config as optim_config_lib

BACKENDS = ("pmap", "shard_map")
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")
NONFINITE_MODES = ("stop", "skip")

# Fields whose default is None, and the type a `--config.<field>=...` override of them parses to.
# config_flags cannot override a plain None (it has no type to parse the string with), so these
# are held as typed FieldReferences: `--config.data.data_dir=gs://...` (every ImageNet launch
# command), `--config.optimizer.sam.rho=0.05`, re-enabling AGC or EMA in configs that turn them off.
OPTIONAL_FIELDS = {
    "data.data_dir": str,
    "optimizer.agc.clipping": float,
    "optimizer.sam.rho": float,
    "optimizer.ema_decay": float,
    "train.steps": int,
    "train.warmup_steps": int,
    "checkpoint.init_from": str,
}


def base_config() -> ml_collections.ConfigDict:
    """Every field of the schema with the NFNet-F0 ImageNet defaults (docs/recipe.md)."""
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "nfnet_f0"  # a `nfnets_jax.models.list_models()` name
    config.model.kwargs = ml_collections.ConfigDict()  # extra constructor kwargs (drop_rate, ...)
    config.model.kwargs.stochdepth_rate = 0.25

    config.data = data_config_lib.default_data_config()

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 4096  # global, over all devices of all processes
    config.train.epochs = 360.0  # used when config.train.steps is None
    config.train.steps = None  # set to count the run in steps instead of epochs
    config.train.seed = 0
    # Set to count the LR warmup in steps (fine-tuning recipes); overrides optimizer.warmup_epochs.
    config.train.warmup_steps = None
    config.train.remat = False  # True: hk.remat per block, less activation memory (experiments.memory_plan)

    config.optimizer = optim_config_lib.default_optimizer_config()
    config.loss = ml_collections.ConfigDict()
    config.loss.label_smoothing = 0.1
    config.precision = ml_collections.ConfigDict()
    config.precision.compute_dtype = "bfloat16"  # params, optimizer and EMA stay float32
    config.parallel = ml_collections.ConfigDict()
    config.parallel.backend = "pmap"  # 'pmap' | 'shard_map'

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3
    # Fine-tuning: start from DeepMind's weights (.npz pickle) or one of our workdirs/.npz files.
    config.checkpoint.init_from = None
    config.checkpoint.init_exclude = [r"^[^/]+/~/linear/"]  # params re-initialised (the head)

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 5000  # 0: only at the end
    config.eval.batch_size = 1024  # global, a multiple of the device count; padding is masked
    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 50
    config.nonfinite = "stop"  # 'stop' | 'skip'
    return make_optional_fields_overridable(config)


def no_variants(config_file: str, arg: str | None) -> None:
    """For configs without variants: `--config=<file>:<arg>` is a mistake, not something to ignore."""
    if arg not in (None, ""):
        raise ValueError(f"{config_file} has no variants: drop ':{arg}' (settings go in "
                         "--config.<field>=<value> flags).")


def make_optional_fields_overridable(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Holds each `OPTIONAL_FIELDS` entry as a typed reference (value unchanged): a placeholder
    (`ml_collections.config_dict.placeholder`) while it is None, a typed `FieldReference` of its
    value otherwise, so that `--config.<field>=...` can set it either way.

    A config file that replaces a whole section after `base_config()` (e.g. `config.data =
    digits_data_config()`) calls this again, so that the section's optional fields stay
    overridable from the command line. Assigning None or a value later keeps the type.
    """
    for path, field_type in OPTIONAL_FIELDS.items():
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        if isinstance(node._fields.get(leaf), ml_collections.FieldReference):  # pylint: disable=protected-access
            continue
        value = node[leaf]
        node[leaf] = (config_dict.placeholder(field_type) if value is None
                      else ml_collections.FieldReference(value, field_type=field_type))
    return config


def missing_fields(config: ml_collections.ConfigDict) -> list[str]:
    """Dotted names of the schema's fields (`base_config()`) that `config` lacks; the model's
    kwargs are the model's own and are not compared."""
    def walk(reference: ml_collections.ConfigDict, node: object, prefix: str) -> list[str]:
        missing = []
        for key, value in reference.items():
            name = f"{prefix}{key}"
            if name == "model.kwargs":
                continue
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                missing.append(name)
            elif isinstance(value, ml_collections.ConfigDict):
                missing += walk(value, node[key], f"{name}.")
        return missing

    return walk(base_config(), config, "")


SEED_LIMIT = 2**31  # seeds feed JAX's PRNG, NumPy's and TensorFlow's: one range all of them take


def validate_config(config: ml_collections.ConfigDict, *, device_count: int,
                    training: bool = True) -> None:
    """Raises ValueError listing every problem in `config`, with what to change.

    Model names are checked against the registry, batch sizes against the device count, and
    the data and optimizer sections by their owners' validators. `training=False`
    (`experiments/eval.py`) leaves out the training batch, which evaluation never builds.
    """
    from nfnets_jax import models  # pylint: disable=import-outside-toplevel

    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"Invalid config: get_config() returned {type(config).__name__}, not an "
                         "ml_collections.ConfigDict; start from config_schema.base_config() (see configs/digits.py).")
    missing = missing_fields(config)
    if missing:
        raise ValueError(f"Invalid config: it lacks {len(missing)} field(s) of the schema ({', '.join(missing[:6])}"
                         f"{', ...' if len(missing) > 6 else ''}); start from config_schema.base_config() "
                         "and change what your recipe changes (see configs/digits.py).")
    problems = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    names = models.list_models()
    need(config.model.name in names,
         f"config.model.name={config.model.name!r} is not a model; choose one of {sorted(names)}")
    batch_size = config.train.batch_size
    need(not training or (isinstance(batch_size, int) and batch_size > 0
                          and batch_size % device_count == 0),
         f"config.train.batch_size={batch_size} must be a positive multiple of the {device_count} "
         f"devices (per-device batch = batch_size / {device_count})")
    if training and isinstance(batch_size, int) and batch_size > 0 and batch_size % device_count == 0:
        per_device = batch_size // device_count
        need(config.data.augment.mix != "mixup_cutmix" or per_device % 2 == 0,
             f"config.data.augment.mix='mixup_cutmix' mixes half of each device's batch with MixUp "
             f"and half with CutMix, so the per-device batch must be even: "
             f"config.train.batch_size={batch_size} gives {per_device} on each of {device_count} "
             "devices")
    need(config.eval.batch_size > 0 and config.eval.batch_size % device_count == 0,
         f"config.eval.batch_size={config.eval.batch_size} must be a positive multiple of the "
         f"{device_count} devices")
    need(config.train.steps is not None or (config.train.epochs or 0) > 0,
         "set config.train.steps or a positive config.train.epochs")
    need(config.train.steps is None or config.train.steps > 0, "config.train.steps must be > 0")
    seed = config.train.seed
    need(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT,
         f"config.train.seed={seed!r} must be an integer in [0, 2**31)")
    need(config.train.warmup_steps is None or config.train.warmup_steps >= 0,
         "config.train.warmup_steps must be >= 0 (or None to use optimizer.warmup_epochs)")
    need(config.parallel.backend in BACKENDS,
         f"config.parallel.backend={config.parallel.backend!r}; choose one of {BACKENDS}")
    need(config.precision.compute_dtype in COMPUTE_DTYPES,
         f"config.precision.compute_dtype={config.precision.compute_dtype!r}; choose one of "
         f"{COMPUTE_DTYPES}")
    need(config.nonfinite in NONFINITE_MODES,
         f"config.nonfinite={config.nonfinite!r}; choose one of {NONFINITE_MODES}")
    need(0 <= config.loss.label_smoothing < 1, "config.loss.label_smoothing must be in [0, 1)")
    need(config.checkpoint.every_steps > 0 and config.checkpoint.keep > 0,
         "config.checkpoint.every_steps and config.checkpoint.keep must be > 0")
    need(config.log.every_steps > 0, "config.log.every_steps must be > 0")
    need(config.eval.every_steps >= 0, "config.eval.every_steps must be >= 0 (0: only at the end)")
    for validate, section in ((data_config_lib.validate_data_config, config.data),
                              (optim_config_lib.validate_optimizer_config, config.optimizer)):
        try:
            validate(section)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(problems))


def default_workdir(config_spec: str) -> str:
    """`./workdirs/<config file stem>[_<arg>]` for a `--config` value such as `configs/nfnet.py:F0`.

    Training and evaluation derive the same folder, so `python -m experiments.eval` with the
    config of a finished `python -m experiments.train` finds its checkpoints.
    """
    path, _, arg = str(config_spec).partition(":")
    return os.path.join(".", "workdirs", pathlib.Path(path).stem + (f"_{arg}" if arg else ""))


def total_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """`config.train.steps`, or epochs x examples // batch as the official code counts them.

    For NFNets on ImageNet: 360 x 1,281,167 // 4096 = 112,602 (official `get_config`).
    """
    if config.train.steps is not None:
        return int(config.train.steps)
    return int(config.train.epochs * num_train_examples // config.train.batch_size)
