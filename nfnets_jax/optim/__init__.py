"""The NFNet optimizer: AGC, parameter groups, schedule, SGD-Nesterov, modified SAM, EMA.

One training step, in order (official `experiment.py:Experiment._train_fn`; docs/recipe.md):
grads per device → pmean → `make_optimizer`'s chain (AGC → masked coupled weight decay →
SGD-Nesterov with `make_lr_schedule`), optionally wrapped in `with_sam` (which takes its own
gradients: ascent on a slice of each device's batch, unsynced, then descent, then pmean) →
`ema.ema_update`. `current_hyperparams` reads the learning rate back from the state.
"""

from nfnets_jax.optim import ema
from nfnets_jax.optim.agc import AGCState, adaptive_grad_clip, clip_fraction_metrics, global_norm
from nfnets_jax.optim.config import default_optimizer_config, validate_optimizer_config
from nfnets_jax.optim.factory import describe_param_groups, make_optimizer
from nfnets_jax.optim.groups import exclusion_mask
from nfnets_jax.optim.hyperparams import current_hyperparams
from nfnets_jax.optim.sam import SAMState, sam_gradients, with_sam, with_sam_from_config
from nfnets_jax.optim.schedules import make_lr_schedule

__all__ = [
    "AGCState",
    "SAMState",
    "adaptive_grad_clip",
    "clip_fraction_metrics",
    "current_hyperparams",
    "default_optimizer_config",
    "describe_param_groups",
    "ema",
    "exclusion_mask",
    "global_norm",
    "make_lr_schedule",
    "make_optimizer",
    "sam_gradients",
    "validate_optimizer_config",
    "with_sam",
    "with_sam_from_config",
]
