"""An experiment from a config, and a run of it from Python: the notebook's entry point.

    exp = nfnets_jax.train.build_experiment(config)                         # the config's optimizer
    exp = nfnets_jax.train.build_experiment(config, optimizer=my_optax_chain)   # or any other
    summary = nfnets_jax.train.run(exp, workdir, num_steps=200)
    steps, losses = summary.series("loss")

`experiments/train.py` builds its experiment with the same `build_experiment` and trains it with
the same loop, so what a notebook tries is what the command line (and a pod) runs: the same
train step, the same JSONL / TensorBoard files and checkpoints in the workdir. Nothing here
touches absl flags or global state, so a notebook can build and run experiments repeatedly in
one kernel.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import optax

from nfnets_jax import models, optim
from nfnets_jax.train import config_schema, loop, pretrained
from nfnets_jax.train import step as step_lib
from nfnets_jax.train.forward import abstract_init, make_forward


def _dataset_info(config: ml_collections.ConfigDict) -> Any:
    from nfnets_jax import data  # pylint: disable=import-outside-toplevel  (TensorFlow: lazy)

    return data.dataset_info(config.data)


def schedule_args(config: ml_collections.ConfigDict, info: Any = None) -> dict[str, Any]:
    """`steps_per_epoch`, `total_steps` and `batch_size` of the run, as `make_optimizer` and
    `make_lr_schedule` take them (`info`: the data set's `DatasetInfo`, read when None)."""
    info = info if info is not None else _dataset_info(config)
    batch_size = config.train.batch_size
    return dict(steps_per_epoch=info.num_train_examples / batch_size,
                total_steps=config_schema.total_train_steps(config, info.num_train_examples),
                batch_size=batch_size)


def optimizer_config(config: ml_collections.ConfigDict, info: Any = None) -> ml_collections.ConfigDict:
    """`config.optimizer`, validated and complete, with `train.warmup_steps` applied."""
    opt_config = optim.validate_optimizer_config(config.optimizer)
    if config.train.warmup_steps is not None:
        opt_config.warmup_epochs = config.train.warmup_steps / schedule_args(config, info)["steps_per_epoch"]
    return opt_config


def config_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer `config.optimizer` describes: AGC -> weight decay -> base optimizer with
    the schedule, inside `optim.with_sam` when `optimizer.sam.rho` is set."""
    info = _dataset_info(config)
    opt_config = optimizer_config(config, info)
    chain = optim.make_optimizer(opt_config, **schedule_args(config, info))
    return optim.with_sam_from_config(chain, opt_config.sam)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The config's schedule (warmup, then cosine to the last step), e.g. for an optax optimizer
    built in a notebook: `optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)`."""
    info = _dataset_info(config)
    return optim.make_lr_schedule(optimizer_config(config, info), **schedule_args(config, info))


def build_experiment(config: ml_collections.ConfigDict, *,
                     optimizer: optax.GradientTransformation | None = None) -> loop.Experiment:
    """The loop's inputs from the config: data iterators, model, optimizer, step settings.

    Args:
      config: an experiment config (`configs/*.py`); checked first, before anything is built.
      optimizer: any optax transformation (a chain, an `inject_hyperparams` optimizer,
        `optim.with_sam(...)`), used instead of the one `config.optimizer` describes. The
        config's optimizer section then only gives the EMA decay; wrap your optimizer in
        `optim.with_sam` yourself for SAM. Build it with `optax.inject_hyperparams` to have its
        learning rate logged.

    Raises:
      ValueError: for a config error or an `optimizer` that is not an optax transformation,
        naming what to change.
    """
    from nfnets_jax import data  # pylint: disable=import-outside-toplevel  (TensorFlow: lazy)

    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            f"optimizer must be an optax transformation (e.g. optax.adamw(1e-3), optim.make_optimizer"
            f"(...), optim.with_sam(...)), got {type(optimizer).__name__}.")
    config_schema.validate_config(config, device_count=jax.device_count())
    if optimizer is not None and optim.validate_optimizer_config(config.optimizer).sam.rho:
        raise ValueError(
            "config.optimizer.sam.rho is set but an optimizer was passed, which replaces the config's: "
            "wrap it yourself (optim.with_sam(optimizer, rho=...)) or set config.optimizer.sam.rho = None.")

    # ---- Input: per-process shards, per-device batches (nfnets_jax/data) ----
    info = data.dataset_info(config.data)
    args = schedule_args(config, info)
    batch_size = args["batch_size"]
    train_batches = lambda start_step: data.make_train_iterator(
        config.data, global_batch_size=batch_size, seed=config.train.seed, start_step=start_step)
    eval_batches = lambda: data.make_eval_iterator(config.data, global_batch_size=config.eval.batch_size)

    # ---- Model: registry name + kwargs from the config (nfnets_jax/models) ----
    model_kwargs = {**config.model.kwargs.to_dict(), **({"remat": True} if config.train.get("remat") else {})}
    forward = make_forward(config.model.name, info.num_classes, model_kwargs)

    # ---- Optimizer: the config's (AGC -> weight decay -> SGD with schedule [in SAM]) or yours ----
    opt_config = optimizer_config(config, info)
    describe_param_groups = None
    if optimizer is None:
        optimizer = optim.with_sam_from_config(optim.make_optimizer(opt_config, **args), opt_config.sam)
        describe_param_groups = lambda params: optim.describe_param_groups(opt_config, params)
    settings = step_lib.settings_from_config(
        config, opt_config, num_classes=info.num_classes,
        agc_groups=models.stage_regexes(config.model.name, **model_kwargs))

    # ---- Fine-tuning: pretrained weights with a fresh head (config.checkpoint.init_from) ----
    initial_params = None
    if config.checkpoint.init_from:
        loaded = pretrained.read_params(config.checkpoint.init_from)
        exclude = list(config.checkpoint.init_exclude)
        # Names and shapes are checked now, against the abstract model, not after the init.
        abstract_params, _ = abstract_init(forward, config.data.image_size)
        pretrained.check_pretrained_fits(loaded, abstract_params, exclude=exclude)
        initial_params = lambda fresh: pretrained.merge_pretrained(loaded, fresh, exclude=exclude)

    return loop.Experiment(
        forward=forward, optimizer=optimizer, step_settings=settings, train_batches=train_batches,
        eval_batches=eval_batches, image_shape=(config.data.image_size, config.data.image_size, 3),
        total_steps=args["total_steps"], global_batch_size=batch_size,
        describe_param_groups=describe_param_groups, initial_params=initial_params, config=config,
    )


def run(experiment: loop.Experiment, workdir: str, *, num_steps: int | None = None,
        config: ml_collections.ConfigDict | None = None, progress_bar: bool | None = None,
        verbose: bool = True) -> loop.RunSummary:
    """Trains `experiment` in `workdir` (resuming from its latest checkpoint) and returns the
    summary, metrics history included (`summary.history`, `summary.series("loss")`).

    Writes what `python -m experiments.train` writes: `config.json`, `metrics.jsonl`,
    TensorBoard events, checkpoints and the curves PNG.

    Args:
      experiment: from `build_experiment`.
      workdir: where checkpoints and metrics go; a workdir with checkpoints is resumed.
      num_steps: stop after this many steps (default: the end of the schedule); a later call
        with the same workdir continues.
      config: the config to run with; defaults to the one `experiment` was built from.
      progress_bar: True (a tqdm bar), False (plain lines), None (a bar in notebooks and
        terminals).
      verbose: False leaves out the parameter-group table and the per-eval lines.
    """
    config = config if config is not None else experiment.config
    if config is None:
        raise ValueError("run: this experiment has no config; pass run(..., config=...) (the one it was built from).")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
    return loop.run(experiment, config, workdir, num_steps=num_steps, progress_bar=progress_bar,
                    verbose=verbose)
