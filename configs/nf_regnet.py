"""NF-RegNet-B0 ... B8 on ImageNet with the official NF-RegNet recipe.

    python -m experiments.train --config=configs/nf_regnet.py:B0 --workdir=./workdirs/nf_regnet_b0

Hardware: 8 GPUs or a TPU v3-8 and up (batch 1024). Not run in this repository.
Expected: the NF-RegNet paper's table could not be checked (docs/paper_numbers.md), so no target is
quoted; timm's own (not to spec) nf_regnet_b1 reaches 79.4% at 288 px (timm's results CSV).

Recipe (`deepmind-research/nfnets/experiment_nf_regnets.py:get_config`, code defaults;
docs/recipe.md): batch 1024, 360 epochs, SGD + Nesterov 0.9,
LR 0.4 not scaled by batch, 5 warmup epochs then cosine to 0.001, no AGC, weight decay
5e-5 + 1e-5 per level (B0 5e-5 ... B5 1e-4; the official table stops at B5 and we continue the
same rule to B8), label smoothing 0.1, EMA 0.99999 with the TF1 warmup, MixUp + CutMix applied
after per-example augmentation, no RandAugment, float32; model width 0.75, expansion 2.25,
SE 0.5, stochastic depth 0.1, SiLU, dropout by variant.
"""

import ml_collections

from nfnets_jax.models import variant_info
from nfnets_jax.train.config_schema import base_config

VARIANTS = tuple(f"B{k}" for k in range(9))


def get_config(arg: str | None = "B0") -> ml_collections.ConfigDict:
    arg = arg or "B0"
    if arg not in VARIANTS:
        raise ValueError(f"configs/nf_regnet.py:{arg} is not a variant; choose one of {VARIANTS}.")
    level = int(arg[1:])
    name = f"nf_regnet_b{level}"
    info = variant_info(name)

    config = base_config()
    config.model.name = name
    config.model.kwargs = ml_collections.ConfigDict(
        {"drop_rate": info["drop_rate"], "stochdepth_rate": 0.1, "width": 0.75,
         "expansion": 2.25, "se_ratio": 0.5, "activation": "silu"})
    config.data.image_size = info["train_imsize"]
    config.data.eval_image_size = info["test_imsize"]
    config.data.augment.randaugment_layers = 0
    config.data.augment.mix = "mixup_cutmix"
    config.data.augment.augment_before_mix = True

    config.train.batch_size = 1024
    config.train.epochs = 360.0
    config.optimizer.lr = 0.4
    config.optimizer.lr_scale_by_batch = False
    config.optimizer.min_lr = 0.001
    config.optimizer.weight_decay = 5e-5 + 1e-5 * level
    config.optimizer.agc.clipping = None
    config.precision.compute_dtype = "float32"
    return config
