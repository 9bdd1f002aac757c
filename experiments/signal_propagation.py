"""Signal Propagation Plots (NF-ResNet paper §4) for models of the zoo, at initialisation.

    python -m experiments.signal_propagation --out=/tmp/spp
    python -m experiments.signal_propagation --out=/tmp/spp --models=nf_resnet101,bn_resnet101 \
        --resolution=224 --batch=32 --width=4

Feeds one batch of N(0, 1) NHWC images through each freshly initialised model and plots, per
residual block: the average channel squared mean and average channel variance of the block
output, and the residual branch's average channel variance (official `base.py:signal_metrics`;
`nfnets_jax.analysis.signal_propagation`). NF models run with every skip gain set to 1 (the
paper's SPP setting; with SkipInit's 0 the blocks would be identities) and get their analytic
expected_std² as a dashed line; BN models run in training mode (batch statistics).

Writes `signal_propagation.png` (three panels, one line per model) and
`signal_propagation.json` (every number plus the settings) under `--out`, and prints one JSON
line: the paths and a few key numbers per model.

What matches the paper: the three statistics, N(0, 1) inputs, the initialisation, skip gain 1,
α = 0.2, BN in training mode, the pre-activation BN-ReLU ordering, the stage structure, full
width (256…2048 channels) and 224 px (the usual ImageNet size; the figures' exact resolution
and batch are unverified). What is reduced so that the default run takes under a minute on 2
CPU cores: the depth (ResNet-50, 16 blocks, instead of the paper's ResNet-600, 200 blocks;
`nf_resnet600` exists, `bn_resnet` stops at 200) and the batch (16; the 2022 ICLR blog uses
1000). Smaller `--resolution` runs faster but the zero padding of the 3×3 convs then lowers
the branch variance on the last stages' small maps (4×4 at 128 px), so the NF curve sits up
to ~10% below expected_std² there; at 224 px it tracks within a few percent.

NFNets and NF-RegNets run too, but white-noise input is a poor probe for them: their strided
transitions average-pool the shortcut, which divides the variance of a spatially uncorrelated
signal by 4, so their curves fall far below expected_std² after each stride (F0 at 128 px ends
near 0.01). `--probe=smooth` feeds spatially correlated, per-channel standardised noise instead
(`signal_propagation.smooth_images`), an image-like input that the pooling barely attenuates;
docs/reproduction.md compares both probes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from nfnets_jax.analysis import signal_propagation

from . import command_line

FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_string("out", None, "Directory for the PNG and JSON (created).", flag_values=FLAGS)
flags.DEFINE_list("models", ["nf_resnet50", "bn_resnet50"], "Comma-separated registry names.", flag_values=FLAGS)
flags.DEFINE_integer("resolution", 224, "Input px (224: ImageNet size).", lower_bound=8, flag_values=FLAGS)
flags.DEFINE_integer("batch", 16, "N(0,1) images in the batch.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("width", None, "Width multiplier for every model (default: each model's own; ResNets: 4 = "
                   "the paper's 256…2048 channels).", flag_values=FLAGS)
flags.DEFINE_list("depths", None, "Blocks per stage for every model, e.g. 1,1,1,1 (default: each variant's own).",
                  flag_values=FLAGS)
flags.DEFINE_enum("probe", "gaussian", sorted(signal_propagation.PROBES),
                  "Input: N(0,1) white noise (the paper's) or image-like smoothed noise.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the parameters and of the input batch.", flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)

PNG_NAME = "signal_propagation.png"
JSON_NAME = "signal_propagation.json"


def plot(results: Sequence[signal_propagation.SignalPropagation], png_path: str, title: str) -> str:
    """The paper's three SPP panels against block depth, one line per model; returns the path.

    Squared mean and variance are on a log scale (they span decades across models); the
    branch variance, which should sit near 1, is on a linear one. Dotted verticals mark
    transition blocks (first block of a stage); dashed lines are NF models' expected_std².
    """
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import matplotlib.ticker  # pylint: disable=import-outside-toplevel

    fig, (ax_mean, ax_var, ax_branch) = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    transitions: set[int] = set()
    for index, result in enumerate(results):
        color = colors[index % len(colors)]
        depth = np.arange(1, len(result.stages) + 1)
        transitions.update(result.transitions)
        mode = "train-mode BN" if result.is_training else "skip gain 1"
        label = f"{result.model} ({mode})"
        ax_mean.plot(depth, result.avg_squared_mean, marker="o", markersize=3, color=color, label=label)
        ax_var.plot(depth, result.avg_variance, marker="o", markersize=3, color=color, label=label)
        if result.expected_variance is not None:
            ax_var.plot(depth, result.expected_variance, linestyle="--", color=color, alpha=0.8,
                        label=f"{result.model} expected_std²")
        ax_branch.plot(depth, result.branch_variance, marker="o", markersize=3, color=color)
    for axis in (ax_mean, ax_var, ax_branch):
        for transition in sorted(transitions):
            axis.axvline(transition + 1, color="0.75", linestyle=":", linewidth=1)
        axis.set_xlabel("residual block (dotted: first block of a stage)")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.25, axis="y")
    ax_mean.set_yscale("log")
    ax_mean.set_title("average channel squared mean")
    ax_var.set_yscale("log")
    ax_var.set_title("average channel variance")
    # Plain numbers on the variance axis; label the minor ticks too when it spans under a
    # decade (ResNet-50: about 1 to 5), where there would otherwise be a single label.
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax_var.yaxis.set_major_formatter(plain)
    low, high = ax_var.get_ylim()
    ax_var.yaxis.set_minor_formatter(plain if high / low < 10 else matplotlib.ticker.NullFormatter())
    ax_branch.axhline(1.0, color="0.5", linestyle="--", linewidth=1, label="1 (variance-preserving)")
    if any(result.is_training for result in results):
        # A He-init conv after BN-ReLU: unit second moment, of which 1/π is channel mean.
        ax_branch.axhline(1.0 - 1.0 / np.pi, color="0.5", linestyle=":", linewidth=1,
                          label="1 − 1/π (BN-ReLU → He-init conv)")
    ax_branch.legend(fontsize="small", loc="lower left")
    ax_branch.set_ylim(0.0, max(1.3, 1.1 * max(float(np.max(r.branch_variance)) for r in results)))
    ax_branch.set_title("residual branch average channel variance")
    ax_var.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _summary(result: signal_propagation.SignalPropagation) -> dict[str, Any]:
    """A few numbers a reader can check against the plot."""
    summary = {
        "blocks": len(result.stages),
        "last_avg_variance": round(float(result.avg_variance[-1]), 4),
        "max_avg_variance": round(float(np.max(result.avg_variance)), 4),
        "max_avg_squared_mean": round(float(np.max(result.avg_squared_mean)), 4),
        "mean_branch_variance": round(float(np.mean(result.branch_variance)), 4),
    }
    if result.expected_variance is not None:
        ratio = result.avg_variance / result.expected_variance
        summary["variance_over_expected_min_max"] = [round(float(ratio.min()), 4), round(float(ratio.max()), 4)]
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False)
    args = FLAGS
    names = [name for name in args.models if name]
    if not names:
        command_line.fail("--models needs at least one registry name, e.g. nf_resnet50,bn_resnet50")
    try:
        depths = None if args.depths is None else tuple(int(part) for part in args.depths)
    except ValueError:
        command_line.fail(f"--depths={','.join(args.depths)}: blocks per stage are integers, e.g. 1,1,1,1")
    width = args.width
    if width is not None and float(width).is_integer():
        width = int(width)
    model_kwargs: dict[str, Any] = {}
    if width is not None:
        model_kwargs["width"] = width
    if depths is not None:
        model_kwargs["depths"] = depths

    start = time.perf_counter()
    images = signal_propagation.PROBES[args.probe](args.batch, args.resolution, seed=args.seed)
    results = [signal_propagation.measure(name, images, seed=args.seed, **model_kwargs) for name in names]

    os.makedirs(args.out, exist_ok=True)
    settings = {
        "models": names,
        "resolution": args.resolution,
        "batch": args.batch,
        "width": width,
        "depths": None if depths is None else list(depths),
        "seed": args.seed,
        "input": "N(0,1) NHWC" if args.probe == "gaussian" else "smoothed N(0,1), standardised per channel",
        "probe": args.probe,
        "skip_gain": 1.0,
    }
    json_path = os.path.join(args.out, JSON_NAME)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "results": [r.to_json() for r in results]}, f, indent=1)
    title = (f"Signal propagation at init: {'N(0,1)' if args.probe == 'gaussian' else 'image-like (smoothed)'} input, batch {args.batch}, "
             f"{args.resolution}×{args.resolution} px, {'default widths' if width is None else f'width {width}'}"
             + ("" if depths is None else f", depths {list(depths)}"))
    png_path = plot(results, os.path.join(args.out, PNG_NAME), title)

    summary = {
        "png": png_path,
        "json": json_path,
        "seconds": round(time.perf_counter() - start, 1),
        **{k: settings[k] for k in ("resolution", "batch", "width", "depths")},
        "models": {r.model: _summary(r) for r in results},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
