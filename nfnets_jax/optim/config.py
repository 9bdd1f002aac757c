"""The optimizer section of the config (`config.optimizer`): defaults and validation.

Defaults are the NFNet ImageNet recipe (paper App. A.1; docs/recipe.md): SGD with
Nesterov momentum 0.9, base LR 0.1 per 256 examples, 5 warmup epochs then cosine to 0,
coupled weight decay 2e-5 on weights only, AGC λ = 0.01 / ε = 1e-3 on everything but the
classifier weight, EMA 0.99999 with the TF1 warmup, SAM off.

Every value a user can get wrong is checked here, before any array is built, with a message
that names the field and says what to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import optax

from nfnets_jax.optim import groups as groups_lib
from nfnets_jax.optim import schedules

# Gains and biases get no weight decay: a leaf named `b`, `scale` or `offset` (Linear,
# BatchNorm) or whose name contains `gain` or `bias` (WSConv gain and bias, the SkipInit
# `skip_gain`). This is the official predicate on the leaf name (`Experiment._make_opt` in
# `experiment_nfnets.py`; 151 leaves of F0). One pattern, so that no model family (NF or
# BatchNorm) triggers an "unmatched pattern" warning.
DEFAULT_WD_EXCLUDE = (r"/(b|scale|offset|[^/]*(gain|bias)[^/]*)$",)

# The classifier weight only: a `linear` module directly under the model's top-level scope
# (`NFNet/~/linear/w`, and the same for NF-ResNet / NF-RegNet), never a squeeze-excite linear
# (`NFNet/~/nf_block_3/squeeze_excite/~/linear/w`). Its bias is still clipped, as in the code.
DEFAULT_AGC_EXCLUDE = (r"^[^/]+/~/linear/w$",)

_TOP_LEVEL_FIELDS = (
    "name", "lr", "lr_scale_by_batch", "warmup_epochs", "schedule", "min_lr", "momentum",
    "nesterov", "weight_decay", "wd_exclude", "agc", "sam", "ema_decay", "base_kwargs",
)
_AGC_FIELDS = ("clipping", "eps", "exclude")
_SAM_FIELDS = ("rho", "ascent_fraction", "sync_ascent")


def default_optimizer_config() -> ml_collections.ConfigDict:
    """The NFNet paper's optimizer settings, as a ConfigDict the experiment configs start from."""
    return ml_collections.ConfigDict(
        {
            "name": "sgd",
            "lr": 0.1,
            "lr_scale_by_batch": True,
            "warmup_epochs": 5.0,
            "schedule": "cosine",
            "min_lr": 0.0,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 2e-5,
            "wd_exclude": list(DEFAULT_WD_EXCLUDE),
            "agc": {"clipping": 0.01, "eps": 1e-3, "exclude": list(DEFAULT_AGC_EXCLUDE)},
            "sam": {"rho": None, "ascent_fraction": 0.2, "sync_ascent": False},
            "ema_decay": 0.99999,
            "base_kwargs": {},
        },
        type_safe=False,
    )


def _merge_with_defaults(opt_config: Any) -> ml_collections.ConfigDict:
    """Fills fields the user left out from the defaults; rejects fields we do not know."""
    if isinstance(opt_config, ml_collections.ConfigDict):
        given = opt_config.to_dict()
    elif isinstance(opt_config, Mapping):
        given = dict(opt_config)
    else:
        raise ValueError(f"The optimizer config must be a ConfigDict or a dict, got {type(opt_config).__name__}.")
    unknown = sorted(set(given) - set(_TOP_LEVEL_FIELDS))
    if unknown:
        raise ValueError(f"Unknown optimizer config field(s) {unknown}; valid fields: {list(_TOP_LEVEL_FIELDS)}.")
    merged = default_optimizer_config().to_dict()
    for key, value in given.items():
        if isinstance(value, ml_collections.ConfigDict):  # a ConfigDict section inside a plain dict
            value = value.to_dict()
        if key in ("agc", "sam") and not (value is None or isinstance(value, Mapping)):
            raise ValueError(
                f"optimizer.{key} must be a section (a dict with fields "
                f"{list(_AGC_FIELDS if key == 'agc' else _SAM_FIELDS)}) or None, got {value!r}; e.g. "
                + ("optimizer.agc.clipping = 0.01." if key == "agc" else "optimizer.sam.rho = 0.05.")
            )
        if key in ("agc", "sam") and isinstance(value, Mapping):
            fields = _AGC_FIELDS if key == "agc" else _SAM_FIELDS
            unknown_sub = sorted(set(value) - set(fields))
            if unknown_sub:
                raise ValueError(f"Unknown optimizer.{key} field(s) {unknown_sub}; valid fields: {list(fields)}.")
            merged[key].update(dict(value))
        else:
            merged[key] = value
    return ml_collections.ConfigDict(merged, type_safe=False)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def agc_enabled(opt_config: Any) -> bool:
    """AGC is off when the `agc` section is None or its clipping is None/0."""
    return opt_config.agc is not None and bool(opt_config.agc.clipping)


def ema_enabled(opt_config: Any) -> bool:
    """EMA is off when `ema_decay` is None or 0 (a decay of 0 would only copy the params); 0 is
    how to switch it off from the command line, where None cannot be typed."""
    return bool(opt_config.ema_decay)


def sam_enabled(opt_config: Any) -> bool:
    """SAM is off when the `sam` section is None or its rho is None/0."""
    return opt_config.sam is not None and bool(opt_config.sam.rho)


def validate_optimizer_config(opt_config: Any) -> ml_collections.ConfigDict:
    """Checks every field and returns a complete copy (missing fields take the defaults).

    Raises:
      ValueError: naming the field and the fix, for an unknown optimizer name, a negative LR,
        a fraction outside (0, 1], a regex that does not compile, and similar.
    """
    config = _merge_with_defaults(opt_config)
    name = config.name
    _require(
        isinstance(name, str) and bool(name),
        f"optimizer.name must be 'sgd' or an optax optimizer name, got {name!r}.",
    )
    if name != "sgd":
        factory_fn = getattr(optax, name, None)
        _require(
            callable(factory_fn) and not name.startswith("_"),
            f"optimizer.name {name!r} is not an optax optimizer; use 'sgd' (the NFNet recipe) or "
            "a function of the optax namespace such as 'adamw', 'lamb', 'lion', 'rmsprop'.",
        )
    _require(_is_number(config.lr) and config.lr >= 0, f"optimizer.lr must be a number >= 0, got {config.lr!r}.")
    _require(isinstance(config.lr_scale_by_batch, bool), "optimizer.lr_scale_by_batch must be True or False.")
    _require(
        _is_number(config.warmup_epochs) and config.warmup_epochs >= 0,
        f"optimizer.warmup_epochs must be >= 0, got {config.warmup_epochs!r}.",
    )
    _require(
        config.schedule in schedules.SCHEDULES,
        f"optimizer.schedule must be one of {schedules.SCHEDULES}, got {config.schedule!r}.",
    )
    _require(
        _is_number(config.min_lr) and config.min_lr >= 0,
        f"optimizer.min_lr must be >= 0 (an absolute LR, compared with the scaled peak when the "
        f"schedule is built), got {config.min_lr!r}.",
    )
    _require(
        config.momentum is None or (_is_number(config.momentum) and 0 <= config.momentum < 1),
        f"optimizer.momentum must be in [0, 1) or None, got {config.momentum!r}.",
    )
    _require(isinstance(config.nesterov, bool), "optimizer.nesterov must be True or False.")
    _require(
        config.weight_decay is None or (_is_number(config.weight_decay) and config.weight_decay >= 0),
        f"optimizer.weight_decay must be >= 0 or None, got {config.weight_decay!r}.",
    )
    groups_lib.compile_patterns(config.wd_exclude, "optimizer.wd_exclude")
    if config.agc is not None:
        clipping = config.agc.clipping
        _require(
            clipping is None or (_is_number(clipping) and clipping >= 0),
            f"optimizer.agc.clipping must be > 0 (or None/0 to disable AGC), got {clipping!r}.",
        )
        _require(
            _is_number(config.agc.eps) and config.agc.eps >= 0,
            f"optimizer.agc.eps must be >= 0, got {config.agc.eps!r}.",
        )
        groups_lib.compile_patterns(config.agc.exclude, "optimizer.agc.exclude")
    if config.sam is not None:
        rho = config.sam.rho
        _require(
            rho is None or (_is_number(rho) and rho >= 0),
            f"optimizer.sam.rho must be > 0 (or None/0 to disable SAM), got {rho!r}.",
        )
        fraction = config.sam.ascent_fraction
        _require(
            _is_number(fraction) and 0 < fraction <= 1,
            f"optimizer.sam.ascent_fraction must be in (0, 1], got {fraction!r}.",
        )
        _require(isinstance(config.sam.sync_ascent, bool), "optimizer.sam.sync_ascent must be True or False.")
    _require(
        config.ema_decay is None or (_is_number(config.ema_decay) and 0 <= config.ema_decay < 1),
        f"optimizer.ema_decay must be in [0, 1) (0 or None: EMA off), got {config.ema_decay!r}.",
    )
    _require(
        isinstance(config.base_kwargs, (Mapping, ml_collections.ConfigDict)),
        f"optimizer.base_kwargs must be a dict of keyword arguments, got {config.base_kwargs!r}.",
    )
    return config


def base_kwargs(opt_config: Any) -> dict[str, Any]:
    """`optimizer.base_kwargs` as a plain dict (it may arrive as a ConfigDict)."""
    kwargs = opt_config.base_kwargs
    if isinstance(kwargs, ml_collections.ConfigDict):
        return kwargs.to_dict()
    return dict(kwargs)
