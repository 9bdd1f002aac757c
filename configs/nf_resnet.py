"""NF-ResNets with AGC: the 90-epoch recipe of the paper's batch-size study.

    python -m experiments.train --config=configs/nf_resnet.py:50 --workdir=./workdirs/nf_resnet50

Hardware: 8 GPUs or a TPU v3-8 and up (batch 4096 at 224 px). Not run in this repository.
Expected: the paper reports these runs only as plots (Figure 2 for ResNet-50, Figure 7 for
ResNet-200; paper §4.1): with AGC, NF-ResNets match or beat BN-ResNets from batch 256 to
4096 over 90 epochs. No table numbers exist to quote.

Recipe (paper §4.1): SGD + Nesterov 0.9 for 90 epochs, base LR 0.1 per 256 examples scaled
linearly with the batch (1.6 at 4096), 5 warmup epochs and cosine decay, AGC λ = 0.01 (the
paper's choice for batch 1024-4096; smaller batches tolerate larger λ; sweep it with
configs/agc_ablation.py), label smoothing 0.1, weight decay 5e-5 on weights only (our choice:
the study does not state it), float32, 224 px crops and flips only (no MixUp/CutMix/RandAugment).
`:50`, `:101`, `:152`, `:200`, `:288`, `:600` pick the depth; `:se50` etc. add squeeze-excite.
"""

import ml_collections

from nfnets_jax.train.config_schema import base_config

DEPTHS = ("50", "101", "152", "200", "288", "600")


def resnet_study_config(model_name: str, batch_size: int = 4096) -> ml_collections.ConfigDict:
    """The 90-epoch NF-ResNet recipe at `batch_size` (shared with configs/agc_ablation.py)."""
    config = base_config()
    config.model.name = model_name
    config.model.kwargs = ml_collections.ConfigDict({"drop_rate": 0.0})
    config.data.image_size = 224
    config.data.eval_image_size = 224
    config.data.eval_preprocess = "crop_resize"
    config.data.augment.randaugment_layers = 0
    config.data.augment.mix = "none"
    config.train.batch_size = batch_size
    config.train.epochs = 90.0
    config.optimizer.weight_decay = 5e-5
    config.optimizer.agc.clipping = 0.01
    config.optimizer.ema_decay = None
    config.precision.compute_dtype = "float32"
    return config


def get_config(arg: str | None = "50") -> ml_collections.ConfigDict:
    arg = arg or "50"
    se = arg.startswith("se")
    depth = arg[2:] if se else arg
    if depth not in DEPTHS:
        raise ValueError(f"configs/nf_resnet.py:{arg}: choose a depth in {DEPTHS}, optionally "
                         "prefixed with 'se' (e.g. :se50).")
    return resnet_study_config(f"nf_{'se' if se else ''}resnet{depth}")
