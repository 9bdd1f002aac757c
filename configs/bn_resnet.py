"""The BatchNorm ResNet baseline with the official base recipe.

    python -m experiments.train --config=configs/bn_resnet.py:50 --workdir=./workdirs/bn_resnet50

Hardware: 8 GPUs or a TPU v3-8 (batch 1024 at 224 px). Not run in this repository.
Expected: about 76-78% ImageNet top-1 for ResNet-50 over 90 epochs with label smoothing
(a standard number; the NFNet paper's BN baselines are in its Figure 2 plots (paper §4.1),
and its transfer Table 4 lists BN-ResNet-50 at 78.1 after JFT pre-training).

Recipe (docs/recipe.md): batch 1024, 90 epochs, SGD + Nesterov 0.9, LR 0.1·B/256 =
0.4 with 5 warmup epochs then cosine to 0, weight decay 1e-4 (not on BN scale/offset or biases),
label smoothing 0.1, no EMA, no AGC, no augmentation beyond crop and flip, float32,
aspect-preserving centre crop for evaluation.
"""

import ml_collections

from nfnets_jax.train.config_schema import base_config

DEPTHS = ("50", "101", "152", "200")


def get_config(arg: str | None = "50") -> ml_collections.ConfigDict:
    arg = arg or "50"
    if arg not in DEPTHS:
        raise ValueError(f"configs/bn_resnet.py:{arg}: choose a depth in {DEPTHS}.")
    config = base_config()
    config.model.name = f"bn_resnet{arg}"
    config.model.kwargs = ml_collections.ConfigDict()
    config.data.image_size = 224
    config.data.eval_image_size = 224
    config.data.eval_preprocess = "crop_resize"
    config.data.augment.randaugment_layers = 0
    config.data.augment.mix = "none"
    config.train.batch_size = 1024
    config.train.epochs = 90.0
    config.optimizer.weight_decay = 1e-4
    config.optimizer.agc.clipping = None
    config.optimizer.ema_decay = None
    config.precision.compute_dtype = "float32"
    return config
