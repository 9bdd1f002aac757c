"""From a config to everything a run needs: the one builder.

    parts = build_parts(config, num_classes=10, num_train_examples=60_000)   # no data opened
    experiment = build_experiment(config)        # parts + the config's data + pretrained weights
    summary = nfnets_jax.train.run(experiment, workdir)

`build_parts` turns a config into the model's forward, the optimizer (AGC -> weight decay -> SGD
with its schedule, in SAM when `optimizer.sam.rho` is set), the step's `StepSettings` and the
loop's `RunSettings`. It is the only code that reads a config for those: the runner
(`build_experiment`, `experiments/train.py`), notebooks, the one-device step of the benchmarks and
the memory plan, and the reproduction analyses all build through it, so what a notebook or a
benchmark measures is what the command line and a pod run. The config is validated once, here.

Nothing here touches absl flags, devices or global state, so a notebook can build experiments
repeatedly in one kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfnets_jax import models, optim, weights
from nfnets_jax.optim import config as optim_config_lib
from nfnets_jax.train import checkpointing, config_schema
from nfnets_jax.train.loop import Experiment, RunSettings
from nfnets_jax.train.step import StepSettings


@dataclasses.dataclass(frozen=True)
class TrainingParts:
    """What a config says about training, built.

    Attributes:
      forward: `hk.transform_with_state` of `(images, is_training) -> logits`.
      optimizer: the config's optax chain, or the one passed to `build_parts`.
      step_settings: the train step's settings (`nfnets_jax.train.step`).
      run_settings: the loop's settings (`nfnets_jax.train.loop`).
      optimizer_config: `config.optimizer`, validated and completed (warmup in epochs).
      describe_param_groups: `params -> str`, the AGC / weight-decay groups of the config's
        optimizer (None for an optimizer passed in).
    """

    forward: hk.TransformedWithState
    optimizer: optax.GradientTransformation
    step_settings: StepSettings
    run_settings: RunSettings
    optimizer_config: ml_collections.ConfigDict
    describe_param_groups: Callable[[hk.Params], str] | None


def schedule_args(config: ml_collections.ConfigDict, num_train_examples: int) -> dict[str, Any]:
    """`steps_per_epoch`, `total_steps` and `batch_size` of the run, as `optim.make_optimizer` and
    `optim.make_lr_schedule` take them."""
    batch_size = config.train.batch_size
    return dict(steps_per_epoch=num_train_examples / batch_size,
                total_steps=config_schema.total_train_steps(config, num_train_examples),
                batch_size=batch_size)


def optimizer_config(config: ml_collections.ConfigDict, num_train_examples: int) -> ml_collections.ConfigDict:
    """`config.optimizer`, validated and complete, with `train.warmup_steps` turned into epochs."""
    opt_config = optim.validate_optimizer_config(config.optimizer)
    if config.train.warmup_steps is not None:
        steps_per_epoch = schedule_args(config, num_train_examples)["steps_per_epoch"]
        opt_config.warmup_epochs = config.train.warmup_steps / steps_per_epoch
    return opt_config


def step_settings_from_config(config: ml_collections.ConfigDict, opt_config: ml_collections.ConfigDict, *,
                              num_classes: int, agc_groups: Mapping[str, str] | None) -> StepSettings:
    """The train step's settings: `config.loss`, `config.precision` and the EMA of `opt_config`.

    `agc_groups` (label -> regex, e.g. `models.stage_regexes`) name the per-stage clip fractions;
    they are only reported when the optimizer has an AGC.
    """
    return StepSettings(
        num_classes=num_classes,
        label_smoothing=config.loss.label_smoothing,
        compute_dtype=jnp.dtype(config.precision.compute_dtype),
        ema_decay=opt_config.ema_decay if optim_config_lib.ema_enabled(opt_config) else None,
        agc_groups=None if agc_groups is None else dict(agc_groups),
    )


def run_settings_from_config(config: ml_collections.ConfigDict, *, total_steps: int,
                             image_shape: tuple[int, int, int]) -> RunSettings:
    """The loop's settings: `config.train` (seed, batch), `config.parallel`, `config.checkpoint`,
    `config.eval`, `config.log`, `config.nonfinite`, and the config itself for `config.json`."""
    return RunSettings(
        seed=int(config.train.seed), backend=config.parallel.backend, total_steps=int(total_steps),
        global_batch_size=int(config.train.batch_size), image_shape=tuple(image_shape),
        log_every_steps=config.log.every_steps, eval_every_steps=config.eval.every_steps,
        checkpoint_every_steps=config.checkpoint.every_steps, checkpoints_kept=config.checkpoint.keep,
        nonfinite=config.nonfinite, config_json=config.to_json_best_effort(indent=2))


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.model.kwargs`, with `hk.remat` per block when `config.train.remat` is set."""
    return {**config.model.kwargs.to_dict(), **({"remat": True} if config.train.get("remat") else {})}


def build_forward(config: ml_collections.ConfigDict, num_classes: int) -> tuple[hk.TransformedWithState,
                                                                              dict[str, str]]:
    """(forward, AGC groups) of `config.model`: the registry's model with the config's kwargs, and
    its per-stage parameter regexes (for the clip fractions the step logs)."""
    kwargs = model_kwargs(config)
    return (models.make_forward(config.model.name, num_classes, kwargs),
            models.stage_regexes(config.model.name, **kwargs))


def build_parts(config: ml_collections.ConfigDict, *, num_classes: int, num_train_examples: int,
                image_shape: tuple[int, int, int] | None = None,
                optimizer: optax.GradientTransformation | None = None,
                forward: hk.TransformedWithState | None = None,
                agc_groups: Mapping[str, str] | None = None, device_count: int | None = None
                ) -> TrainingParts:
    """The forward, optimizer and settings `config` describes, without opening any data.

    Args:
      config: an experiment config (`configs/*.py`); validated first (`config_schema`).
      num_classes: classes of the model's head (the data set's).
      num_train_examples: the data set's training examples (epochs -> steps, the schedule).
      image_shape: (H, W, C) of training images (default: `config.data.image_size`, RGB).
      optimizer: any optax transformation, used instead of the one `config.optimizer` describes;
        the config's optimizer section then only gives the EMA decay. Wrap it in `optim.with_sam`
        yourself for SAM; build it with `optax.inject_hyperparams` to have its learning rate logged.
      forward: a model to use instead of `config.model` (tests use a fake one), with `agc_groups`
        naming its AGC groups for the per-stage clip fractions.
      device_count: the devices the global batch is split over (default: all of them).

    Raises:
      ValueError: for a config error or an `optimizer` that is not an optax transformation,
        naming what to change.
    """
    config_schema.validate_config(config, device_count=jax.device_count() if device_count is None
                                  else device_count)
    return _parts(config, num_classes=num_classes, num_train_examples=num_train_examples,
                  image_shape=image_shape, optimizer=optimizer, forward=forward, agc_groups=agc_groups)


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            f"optimizer must be an optax transformation (e.g. optax.adamw(1e-3), optim.make_optimizer"
            f"(...), optim.with_sam(...)), got {type(optimizer).__name__}.")


def _parts(config: ml_collections.ConfigDict, *, num_classes: int, num_train_examples: int,
           image_shape: tuple[int, int, int] | None, optimizer: optax.GradientTransformation | None,
           forward: hk.TransformedWithState | None, agc_groups: Mapping[str, str] | None) -> TrainingParts:
    """`build_parts` for a config already validated."""
    _check_optimizer(optimizer)
    opt_config = optimizer_config(config, num_train_examples)
    if optimizer is not None and opt_config.sam.rho:
        raise ValueError(
            "config.optimizer.sam.rho is set but an optimizer was passed, which replaces the config's: "
            "wrap it yourself (optim.with_sam(optimizer, rho=...)) or set config.optimizer.sam.rho = None.")
    args = schedule_args(config, num_train_examples)
    describe = None
    if optimizer is None:
        optimizer = optim.with_sam_from_config(optim.make_optimizer(opt_config, **args), opt_config.sam)
        describe = lambda params: optim.describe_param_groups(opt_config, params)
    if forward is None:
        forward, agc_groups = build_forward(config, num_classes)
    return TrainingParts(
        forward=forward, optimizer=optimizer,
        step_settings=step_settings_from_config(config, opt_config, num_classes=num_classes,
                                                agc_groups=agc_groups),
        run_settings=run_settings_from_config(
            config, total_steps=args["total_steps"],
            image_shape=image_shape or (config.data.image_size, config.data.image_size, 3)),
        optimizer_config=opt_config, describe_param_groups=describe)


def build_experiment(config: ml_collections.ConfigDict, *,
                     optimizer: optax.GradientTransformation | None = None) -> Experiment:
    """Everything the loop needs from the config: `build_parts`, the data's iterators, and the
    pretrained weights of a fine-tuning run (`config.checkpoint.init_from`), checked against the
    model before anything is initialised.

    Args:
      config: an experiment config (`configs/*.py`); validated first, before anything is built.
      optimizer: replaces the config's optimizer (see `build_parts`).

    Raises:
      ValueError: for a config error, naming what to change; `weights.ParamsMismatchError` for
        pretrained weights that do not fit the model; `DatasetUnavailableError` for missing data.
    """
    from nfnets_jax import data  # pylint: disable=import-outside-toplevel  (TensorFlow: lazy)

    _check_optimizer(optimizer)
    config_schema.validate_config(config, device_count=jax.device_count())
    info = data.dataset_info(config.data)
    parts = _parts(config, num_classes=info.num_classes, num_train_examples=info.num_train_examples,
                   image_shape=None, optimizer=optimizer, forward=None, agc_groups=None)
    batch_size = config.train.batch_size
    train_batches = lambda start_step: data.make_train_iterator(
        config.data, global_batch_size=batch_size, seed=config.train.seed, start_step=start_step)
    eval_batches = lambda: data.make_eval_iterator(config.data, global_batch_size=config.eval.batch_size)

    initial_params = None
    if config.checkpoint.init_from:  # fine-tuning: pretrained weights with a fresh head
        loaded = checkpointing.read_params(config.checkpoint.init_from)
        exclude = list(config.checkpoint.init_exclude)
        abstract_params, _ = models.abstract_init(parts.forward, config.data.image_size)
        weights.check_pretrained_fits(loaded, abstract_params, exclude=exclude)
        initial_params = lambda fresh: weights.merge_pretrained(loaded, fresh, exclude=exclude)

    return Experiment(forward=parts.forward, optimizer=parts.optimizer, step_settings=parts.step_settings,
                      run_settings=parts.run_settings, train_batches=train_batches, eval_batches=eval_batches,
                      describe_param_groups=parts.describe_param_groups, initial_params=initial_params)


@dataclasses.dataclass(frozen=True)
class EvaluationParts:
    """What evaluating trained weights needs from a config (`experiments.eval`).

    Attributes:
      forward: the model of `config.model`, with the data set's number of classes.
      image_size: the eval resolution (`config.data.eval_image_size`).
      backend: `config.parallel.backend`.
      eval_batches: `() -> iterator` over one pass of the eval split, padded and masked.
      model_name: `config.model.name`.
      data_description: `<data set>:<split> at <size>px`, for the result line.
    """

    forward: hk.TransformedWithState
    image_size: int
    backend: str
    eval_batches: Callable[[], Any]
    model_name: str
    data_description: str


def build_evaluation(config: ml_collections.ConfigDict) -> EvaluationParts:
    """The eval side of `config`, validated once (without the training batch, which evaluation
    never builds)."""
    from nfnets_jax import data  # pylint: disable=import-outside-toplevel  (TensorFlow: lazy)

    config_schema.validate_config(config, device_count=jax.device_count(), training=False)
    info = data.dataset_info(config.data)
    forward, _ = build_forward(config, info.num_classes)
    size = config.data.eval_image_size
    return EvaluationParts(
        forward=forward, image_size=size, backend=config.parallel.backend,
        eval_batches=lambda: data.make_eval_iterator(config.data, global_batch_size=config.eval.batch_size),
        model_name=config.model.name,
        data_description=f"{config.data.name}:{config.data.eval_split} at {size}px")


def config_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer `config.optimizer` describes, for the config's data set: AGC -> weight decay ->
    base optimizer with the schedule, inside `optim.with_sam` when `optimizer.sam.rho` is set."""
    from nfnets_jax import data  # pylint: disable=import-outside-toplevel  (TensorFlow: lazy)

    info = data.dataset_info(config.data)
    opt_config = optimizer_config(config, info.num_train_examples)
    chain = optim.make_optimizer(opt_config, **schedule_args(config, info.num_train_examples))
    return optim.with_sam_from_config(chain, opt_config.sam)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The config's schedule (warmup, then cosine to the last step), e.g. for an optax optimizer
    built in a notebook: `optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)`."""
    from nfnets_jax import data  # pylint: disable=import-outside-toplevel  (TensorFlow: lazy)

    info = data.dataset_info(config.data)
    return optim.make_lr_schedule(optimizer_config(config, info.num_train_examples),
                                  **schedule_args(config, info.num_train_examples))
