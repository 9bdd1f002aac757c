"""Fine-tune a pretrained NFNet on a new dataset: a fresh head, the paper's fine-tuning recipe.

    python -m experiments.train --config=configs/finetune.py:F0 --workdir=./workdirs/finetune_f0 \
        --config.checkpoint.init_from=/path/to/F0_haiku.npz --config.data.name=cifar100 \
        --config.data.eval_split=test

(A dataset other than ImageNet names its own eval split: CIFAR's is `test`, not `validation`.)
`init_from` takes DeepMind's released `F*_haiku.npz` (https://storage.googleapis.com/dm-nfnets/),
timm's `model.safetensors`, our `.npz`, or one of our workdirs (its latest checkpoint, EMA params). Everything
but the classifier (`config.checkpoint.init_exclude`, the `NFNet/~/linear` layer) is loaded, with
names and shapes checked first; the classifier is re-initialised for the dataset's classes.

Hardware: 8 GPUs or a TPU v3-8 and up (batch 2048 at the variant's train resolution; lower
`--config.train.batch_size` for smaller machines). Not run in this repository.
Expected: the paper fine-tunes its JFT-300M models on ImageNet to 89.2% top-1 with F4/F4+
(paper §6.2, Table 5); results on other datasets depend on the dataset.

Recipe (paper App. A.5): 15,000 steps at batch 2048, LR 0.1 (not scaled by batch) with a
5,000-step linear warmup then cosine to 0, SAM with ρ = 0.05 (ascent on 20% of each device's
batch), weight decay 1e-5, dropout 0.25, stochastic depth 0.1, EMA with the TF1 warmup, AGC
λ = 0.01, label smoothing 0.1, bfloat16; augmentation is crop and flip only (the paper's
pre-training used no more), evaluation at the variant's test resolution.
"""

import ml_collections

from nfnets_jax.models import variant_info
from nfnets_jax.train.config_schema import base_config

VARIANTS = tuple(f"F{k}" for k in range(7))
REQUIRED = "<set --config.checkpoint.init_from to F*_haiku.npz, a .safetensors, our .npz or a workdir>"


def get_config(arg: str | None = "F0") -> ml_collections.ConfigDict:
    arg = arg or "F0"
    if arg not in VARIANTS:
        raise ValueError(f"configs/finetune.py:{arg}: choose a released variant in {VARIANTS}.")
    name = f"nfnet_{arg.lower()}"
    info = variant_info(name)
    config = base_config()
    config.model.name = name
    config.model.kwargs.drop_rate = 0.25
    config.model.kwargs.stochdepth_rate = 0.1

    config.data.name = "imagenet2012"
    config.data.image_size = info["train_imsize"]
    config.data.eval_image_size = info["test_imsize"]
    config.data.augment.randaugment_layers = 0
    config.data.augment.mix = "none"

    config.train.batch_size = 2048
    config.train.steps = 15_000
    config.train.warmup_steps = 5_000
    config.optimizer.lr = 0.1
    config.optimizer.lr_scale_by_batch = False
    config.optimizer.weight_decay = 1e-5
    config.optimizer.sam.rho = 0.05
    config.optimizer.sam.ascent_fraction = 0.2
    config.optimizer.ema_decay = 0.99999
    config.checkpoint.init_from = REQUIRED
    config.eval.every_steps = 2500
    return config
