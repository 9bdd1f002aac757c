"""NFNet-F0 ... F7 on ImageNet with the paper's recipe; `:F5-sam` and `:F6-sam` add SAM.

    python -m experiments.train --config=configs/nfnet.py:F0 --workdir=/mnt/shared/nfnet_f0 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --distributed

(The workdir must be a filesystem every host sees, e.g. a gcsfuse-mounted bucket or NFS: metrics,
plots and orbax checkpoints are written there as plain files.)

Hardware: a TPU pod slice (the paper: TPUv3, 32 examples per core, so batch 4096 wants 128
cores, e.g. v3-128; per-core batches other than 32 change nothing but memory) or a multi-GPU host
(`--config.train.batch_size` must divide by the device count). Not run in this repository.
Expected ImageNet top-1 (paper Table 3, mean of 3 seeds; SAM rows single runs):
F0 83.6, F1 84.7, F2 85.1, F3 85.7, F4 85.9, F5 86.0, F5-sam 86.3, F6-sam 86.5 (F7: none
published). TPUv3 step times: F0 73 ms ... F6+SAM 2774 ms (paper Table 3).

Recipe (paper App. A.1-A.3, `deepmind-research/nfnets/experiment_nfnets.py:get_config`;
docs/recipe.md): batch 4096, 360 epochs, SGD + Nesterov 0.9,
LR 0.1·B/256 = 1.6 with 5 warmup epochs then cosine to 0, coupled weight decay 2e-5 (not on
gains/biases), AGC λ = 0.01 (not on the classifier weight), label smoothing 0.1, EMA 0.99999
with the TF1 warmup, dropout by variant, stochastic depth 0.25, MixUp (α 0.2) on half the batch
and CutMix on the other half, then RandAugment 4 layers at magnitude 5/10/15 by variant,
bfloat16 compute, training at the variant's train resolution and evaluation at its test
resolution (resize to S+32 squashed, centre crop S).

SAM (`:F5-sam`, `:F6-sam`): the ascent step on 20% of each device's batch, unsynced across
devices (paper App. A.4). The paper does not give ρ for these ImageNet runs; 0.05 (its fine-tuning
value and SAM's usual default) is our assumption.
"""

import ml_collections

from nfnets_jax.models import variant_info
from nfnets_jax.train.config_schema import base_config

VARIANTS = tuple(f"F{k}" for k in range(8)) + ("F5-sam", "F6-sam")
SAM_RHO = 0.05
SAM_ASCENT_FRACTION = 0.2


def get_config(arg: str | None = "F0") -> ml_collections.ConfigDict:
    arg = arg or "F0"
    if arg not in VARIANTS:
        raise ValueError(f"configs/nfnet.py:{arg} is not a variant; choose one of {VARIANTS}.")
    variant, _, sam = arg.partition("-")
    info = variant_info(f"nfnet_{variant.lower()}")

    config = base_config()
    config.model.name = f"nfnet_{variant.lower()}"
    config.model.kwargs.drop_rate = info["drop_rate"]
    config.model.kwargs.stochdepth_rate = info["stochdepth_rate"]

    config.data.image_size = info["train_imsize"]
    config.data.eval_image_size = info["test_imsize"]
    config.data.augment.randaugment_layers = 4
    config.data.augment.randaugment_magnitude = info["randaugment_magnitude"]
    config.data.augment.mix = "mixup_cutmix"

    config.train.batch_size = 4096
    config.train.epochs = 360.0
    config.precision.compute_dtype = "bfloat16"
    if sam:
        config.optimizer.sam.rho = SAM_RHO
        config.optimizer.sam.ascent_fraction = SAM_ASCENT_FRACTION
        config.optimizer.sam.sync_ascent = False
    return config
