"""The AGC batch-size study: NF-ResNet, 90 epochs, one run per (batch size, λ) point.

    python -m experiments.train --config=configs/agc_ablation.py:batch=1024,clipping=0.04 \
        --workdir=./workdirs/agc/b1024_c0.04

    # the whole grid, one run per point (paper §4.1: 5 batch sizes x 5 thresholds):
    for b in 256 512 1024 2048 4096; do for c in 0.01 0.02 0.04 0.08 0.16; do
      python -m experiments.train --config=configs/agc_ablation.py:batch=$b,clipping=$c \
          --workdir=./workdirs/agc/b${b}_c${c}; done; done

Hardware: 8 GPUs or a TPU v3-8 and up per run. Not run in this repository.
Expected (paper Figures 2 and 7, plots only): smaller λ is needed as the batch grows; λ = 0.01 is stable
for batch 1024-4096; AGC helps less at small batch sizes. The paper ran 5 seeds per point and
reported the mean of the best 4: add `--config.train.seed=k`.

Arguments: `batch` (256 ... 4096), `clipping` (λ; 0 disables AGC, the no-clipping baseline),
`depth` (50 or 200, the two depths of the study; default 50). The recipe is configs/nf_resnet.py's,
with the base LR 0.1 per 256 examples scaled linearly with the batch.
"""

import pathlib

import ml_collections

from nfnets_jax.train import config_files

BATCH_SIZES = (256, 512, 1024, 2048, 4096)
CLIPPINGS = (0.01, 0.02, 0.04, 0.08, 0.16)
GRID = tuple((batch, clipping) for batch in BATCH_SIZES for clipping in CLIPPINGS)


def _nf_resnet_recipe():
    """configs/nf_resnet.py, loaded by path (config files are not an installed package)."""
    return config_files.load_module(pathlib.Path(__file__).with_name("nf_resnet.py")).resnet_study_config


def parse_arg(arg: str) -> dict[str, str]:
    """'batch=1024,clipping=0.04' -> {'batch': '1024', 'clipping': '0.04'}."""
    pairs = [item.split("=", 1) for item in arg.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"configs/agc_ablation.py:{arg}: write the point as batch=B,clipping=C[,depth=D].")
    values = dict(pairs)
    unknown = sorted(set(values) - {"batch", "clipping", "depth"})
    if unknown:
        raise ValueError(f"configs/agc_ablation.py: unknown argument(s) {unknown}; use batch, clipping, depth.")
    return values


def get_config(arg: str | None = "batch=4096,clipping=0.01") -> ml_collections.ConfigDict:
    values = parse_arg(arg or "batch=4096,clipping=0.01")
    batch = int(values.get("batch", 4096))
    clipping = float(values.get("clipping", 0.01))
    depth = values.get("depth", "50")
    if depth not in ("50", "200"):
        raise ValueError(f"configs/agc_ablation.py: depth={depth}; the study used 50 and 200.")
    if batch not in BATCH_SIZES or (clipping and clipping not in CLIPPINGS):
        raise ValueError(f"configs/agc_ablation.py: batch={batch}, clipping={clipping} is off the "
                         f"paper's grid {BATCH_SIZES} x {CLIPPINGS} (clipping=0: no AGC); edit "
                         "--config.train.batch_size / --config.optimizer.agc.clipping for other points.")
    config = _nf_resnet_recipe()(f"nf_resnet{depth}", batch_size=batch)
    config.optimizer.agc.clipping = clipping or None
    return config
