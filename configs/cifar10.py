"""A small NFNet on CIFAR-10 (TFDS downloads it on first use: needs internet once).

    python -m experiments.train --config=configs/cifar10.py --workdir=./workdirs/cifar10

Hardware: one GPU (or a few CPU hours). Not run in this repository (no internet here).
Expected: not measured. This is the digits demo's recipe scaled to CIFAR-10, for users who want
a real dataset without ImageNet; a network of this size should reach 90%+ test top-1.

Recipe: NFNet with F0's depths (1, 2, 6, 3) at a quarter of F0's widths (64, 128, 384, 384),
group width 32, 32x32 inputs without resizing, batch 256, 100 epochs, SGD + Nesterov, LR 0.1
per 256 examples with 2 warmup epochs and cosine, AGC λ = 0.02, weight decay 5e-5, label
smoothing 0.1, EMA, MixUp + CutMix, float32 (bfloat16 on GPU/TPU works too).
"""

import ml_collections

from nfnets_jax.train.config_schema import base_config, no_variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    no_variants("configs/cifar10.py", arg)
    config = base_config()
    config.model.name = "nfnet_f0"
    config.model.kwargs = ml_collections.ConfigDict(dict(
        widths=(64, 128, 384, 384), group_size=32, stem_channels=(16, 32, 32, 32),
        drop_rate=0.2, stochdepth_rate=0.1))
    config.data.name = "cifar10"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 32
    config.data.eval_image_size = 32
    config.data.eval_preprocess = "none"
    config.data.augment.randaugment_layers = 0
    config.data.augment.mix = "mixup_cutmix"
    config.train.batch_size = 256
    config.train.epochs = 100.0
    config.optimizer.warmup_epochs = 2.0
    config.optimizer.agc.clipping = 0.02
    config.optimizer.weight_decay = 5e-5
    config.precision.compute_dtype = "float32"
    config.eval.every_steps = 2000
    config.eval.batch_size = 512
    return config
