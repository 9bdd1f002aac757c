"""Builds the NFNet optimizer from `config.optimizer`: one optax chain in the paper's order.

    grads (already averaged over devices)
      → AGC, masked to all but the classifier weight          (paper §4.1)
      → coupled weight decay g += λ_wd·w, masked to weights   (official `optim.py:SGD_AGC`)
      → SGD, Nesterov momentum 0.9 in the official form       (official `optim.py:SGD`)
      → − lr(t) with warmup + cosine                          (`optim.py:WarmupCosineDecay`)

optax's `sgd(momentum=0.9, nesterov=True)` keeps a trace buf ← 0.9·buf + g and steps along
g + 0.9·buf, which is exactly the official (PyTorch-style) Nesterov update.

Any other optax optimizer can replace SGD (`name: 'adamw'`, `'lamb'`, ...) and keeps AGC and
both masks. If that optimizer takes its own `weight_decay` and `mask` arguments (adamw, lamb,
lion, ...), the config's weight decay and exclusion mask are handed to it, so it decays the
way it defines (decoupled for adamw); otherwise decay is coupled through the gradient as in
the NFNet recipe. SAM is not part of this chain; wrap the result with `sam.with_sam`.

The base optimizer is built through `optax.inject_hyperparams`, so its learning rate (the
schedule's value at the last update) and its numeric settings (momentum, b1, b2, ...) live in
the optimizer state: the runner logs them from there (`hyperparams.current_hyperparams`), not
from a second copy of the schedule.
"""

from __future__ import annotations

import inspect
from typing import Any

import optax

from nfnets_jax.optim import agc as agc_lib
from nfnets_jax.optim import config as config_lib
from nfnets_jax.optim import groups as groups_lib
from nfnets_jax.optim import schedules

# Arguments the factory fills in itself; setting them in base_kwargs would silently fight it.
_RESERVED_BASE_KWARGS = ("learning_rate", "weight_decay", "mask")


def _takes_decoupled_weight_decay(factory_fn: Any) -> bool:
    """True if an optax optimizer applies its own masked weight decay (adamw, lamb, lion, ...)."""
    parameters = inspect.signature(factory_fn).parameters
    return "weight_decay" in parameters and "mask" in parameters


def _base_optimizer(
    opt_config: Any, schedule: optax.Schedule
) -> tuple[optax.GradientTransformation, bool]:
    """The base optimizer and whether it already applies weight decay itself."""
    kwargs = config_lib.base_kwargs(opt_config)
    reserved = sorted(set(kwargs) & set(_RESERVED_BASE_KWARGS))
    if reserved:
        raise ValueError(
            f"optimizer.base_kwargs must not set {reserved}: the learning rate comes from "
            "optimizer.lr / schedule and weight decay from optimizer.weight_decay / wd_exclude."
        )
    if opt_config.name == "sgd":
        sgd_owned = sorted(set(kwargs) & {"momentum", "nesterov"})
        if sgd_owned:
            raise ValueError(
                f"optimizer.base_kwargs must not set {sgd_owned} for 'sgd': set optimizer.momentum "
                "and optimizer.nesterov instead."
            )
        momentum = opt_config.momentum or None
        nesterov = opt_config.nesterov and momentum is not None
        sgd = optax.inject_hyperparams(optax.sgd)
        return sgd(learning_rate=schedule, momentum=momentum, nesterov=nesterov, **kwargs), False
    factory_fn = getattr(optax, opt_config.name)
    if "learning_rate" not in inspect.signature(factory_fn).parameters:
        raise ValueError(
            f"optax.{opt_config.name} takes no learning_rate, so it is not an optimizer we can "
            "schedule; pick another optimizer.name."
        )
    # Callable arguments other than the learning rate (masks) are not schedules.
    static = [name for name, value in kwargs.items() if callable(value)]
    if _takes_decoupled_weight_decay(factory_fn):
        kwargs["weight_decay"] = opt_config.weight_decay or 0.0
        kwargs["mask"] = groups_lib.exclusion_mask(opt_config.wd_exclude, "optimizer.wd_exclude")
        static.append("mask")
        return optax.inject_hyperparams(factory_fn, static_args=static)(learning_rate=schedule, **kwargs), True
    return optax.inject_hyperparams(factory_fn, static_args=static)(learning_rate=schedule, **kwargs), False


def make_optimizer(
    opt_config: Any, *, steps_per_epoch: float, total_steps: int, batch_size: int
) -> optax.GradientTransformation:
    """AGC (masked) → coupled weight decay (masked) → base optimizer with schedule.

    Args:
      opt_config: `config.optimizer` (see `config.default_optimizer_config`); validated first.
      steps_per_epoch: optimizer steps per epoch (a float reproduces the official warmup).
      total_steps: total optimizer steps; the cosine reaches `min_lr` there.
      batch_size: global batch size, for the batch/256 LR scaling.

    Returns:
      An `optax.GradientTransformationExtraArgs`. Its `update` needs `params` (AGC and weight
      decay read them). It does not include SAM or EMA. Its state holds the base optimizer's
      hyperparameters (`optax.inject_hyperparams`), learning rate included.
    """
    opt_config = config_lib.validate_optimizer_config(opt_config)
    schedule = schedules.make_lr_schedule(
        opt_config, steps_per_epoch=steps_per_epoch, total_steps=total_steps, batch_size=batch_size
    )
    base, decays_itself = _base_optimizer(opt_config, schedule)
    transforms = []
    if config_lib.agc_enabled(opt_config):
        clip = agc_lib.adaptive_grad_clip(opt_config.agc.clipping, opt_config.agc.eps)
        agc_mask = groups_lib.exclusion_mask(opt_config.agc.exclude, "optimizer.agc.exclude")
        transforms.append(optax.masked(clip, agc_mask))
    if opt_config.weight_decay and not decays_itself:
        decay = optax.add_decayed_weights(opt_config.weight_decay)
        wd_mask = groups_lib.exclusion_mask(opt_config.wd_exclude, "optimizer.wd_exclude")
        transforms.append(optax.masked(decay, wd_mask))
    transforms.append(base)
    return optax.chain(*transforms)


def describe_param_groups(opt_config: Any, params: Any) -> str:
    """A table of which parameters get AGC and which get weight decay, for the run's log.

    Also warns (`UserWarning`, and a line in the text) for every exclusion pattern that matches
    no parameter: we warn rather than fail because one config serves several model families
    (e.g. BatchNorm's `scale`/`offset` patterns match nothing in an NFNet).
    """
    opt_config = config_lib.validate_optimizer_config(opt_config)
    leaves = groups_lib.named_leaves(params)
    agc_on = config_lib.agc_enabled(opt_config)
    wd_on = bool(opt_config.weight_decay)
    agc_patterns = opt_config.agc.exclude if agc_on else []
    wd_patterns = opt_config.wd_exclude if wd_on else []
    agc_mask = groups_lib.named_leaves(groups_lib.exclusion_mask(agc_patterns)(params))
    wd_mask = groups_lib.named_leaves(groups_lib.exclusion_mask(wd_patterns)(params))
    clipped = [path for path, flag in agc_mask if flag and agc_on]
    decayed = [path for path, flag in wd_mask if flag and wd_on]

    lines = []
    if agc_on:
        lines.append(
            f"AGC (clipping={opt_config.agc.clipping}, eps={opt_config.agc.eps}): "
            f"{len(clipped)} of {len(leaves)} tensors; exclude={list(opt_config.agc.exclude)}"
        )
    else:
        lines.append("AGC: off")
    if wd_on:
        lines.append(
            f"weight decay {opt_config.weight_decay} ({opt_config.name}): {len(decayed)} of "
            f"{len(leaves)} tensors; exclude={list(opt_config.wd_exclude)}"
        )
    else:
        lines.append("weight decay: off")
    for what, patterns in (("optimizer.agc.exclude", agc_patterns), ("optimizer.wd_exclude", wd_patterns)):
        for pattern in groups_lib.warn_unmatched(patterns, params, what):
            lines.append(f"WARNING {what}: {pattern!r} matches no parameter")

    clipped_set, decayed_set = set(clipped), set(decayed)
    width = max((len(path) for path, _ in leaves), default=4)
    lines.append(f"{'parameter':<{width}}  {'shape':<18} agc   wd")
    for path, leaf in leaves:
        shape = str(tuple(getattr(leaf, "shape", ())))
        agc_flag = "clip" if path in clipped_set else "-"
        wd_flag = "decay" if path in decayed_set else "-"
        lines.append(f"{path:<{width}}  {shape:<18} {agc_flag:<5} {wd_flag}")
    return "\n".join(lines)
