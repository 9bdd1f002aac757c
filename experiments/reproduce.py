"""The paper's central claims, reproduced in miniature on Fashion-MNIST (docs/reproduction.md).

    python -m experiments.reproduce                       # all four claims, the committed setting
    python -m experiments.reproduce --only agc,cost       # some of them
    python -m experiments.reproduce --quick --out /tmp/r  # tiny sizes: proves the machinery

Claims (each writes `<claim>.json` and PNG figures under `--out`, then the page `--doc` is
rewritten from every claim JSON present in `--out`):

- `agc`: AGC vs batch size (Brock et al. 2021 §4.1, Fig. 2) — a small NF-ResNet at several λ,
  without AGC, and the same-depth BN-ResNet, on Fashion-MNIST downsampled to 14 px, batch
  256 → 4096 with LR 0.1 × batch/256 and the paper's warmup + cosine, the same number of epochs
  at every batch, several seeds; the λ grid is extended at each batch until its best λ is
  bracketed. Per run: test top-1, divergence, the fraction of AGC units clipped per stage.
- `agc_steps`: the study's largest batch again, trained for the step count of a smaller batch of
  `agc` (4096 for 60 epochs: batch 1024's 879 steps), so that "large batch" is not confounded with
  "too few steps"; judged against that batch's rows of `agc.json`.
- `nf_vs_bn`: the same NFNet architecture with and without BatchNorm (§3): Fashion-MNIST
  accuracy over seeds, step time (interleaved repeats) and XLA's peak-memory estimate.
- `cost`: the step time of plain / AGC / modified SAM (20 % ascent, unsynced) / full SAM on the
  F0 train step and on the Fashion-MNIST NFNet, at batches whose 20 % is a whole number of
  images (§4, §6.1).
- `spp`: signal propagation at init (NF-ResNet paper §4, Fig. 1): NF-ResNet vs BN-ResNet against
  the analytic 1 + kα², and NFNet / NF-RegNet probed with white noise, image-like noise and real
  Fashion-MNIST images.

Every training run of `agc` and `nf_vs_bn` is one JSON file under `<out>/runs/<claim>-<key>/`
(`key`: a hash of the settings that shape the run), written atomically and reused when present,
so a killed study continues where it stopped and finished runs are never redone. The verdicts
on the page are computed here from the measurements (`*_verdicts`) and rendered by
`experiments.reproduction_page`; no number on the page is typed by hand.

A progress bar with the time left goes to stderr; one JSON line with the output paths to stdout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from . import command_line

CLAIMS = ("agc", "agc_steps", "nf_vs_bn", "cost", "spp")
DEFAULT_OUT = os.path.join("docs", "reproduction")
DEFAULT_DOC = os.path.join("docs", "reproduction.md")
NO_CLIPPING = math.inf  # λ = inf: AGC present, never clipping (the no-AGC line)

# What the paper reports, quoted on the page next to what was measured here (so the page's
# numbers all come from the JSON, the paper's included).
PAPER = {
    "agc": {"batches": [256, 512, 1024, 2048, 4096], "epochs": 90, "warmup_epochs": 5, "base_lr": 0.1,
            "base_batch": 256, "clippings": [0.01, 0.02, 0.04, 0.08, 0.16], "seeds": 5, "seeds_averaged": 4,
            "depths": [50, 200]},
    "cost": {"agc_target": 1.03, "modified_sam_target": 1.4, "modified_sam_reported": [1.2, 1.4],
             "full_sam_reported": 2.0, "ascent_fraction": 0.2},
}


# ---------------------------------------------------------------- settings (full and --quick)

@dataclasses.dataclass(frozen=True)
class AgcSettings:
    image_size: int = 14  # Fashion-MNIST's 28 px averaged over 2×2 blocks
    width: float = 0.25  # NF-/BN-ResNet with 16…128 channels
    depths: tuple[int, ...] = (1, 1, 1, 1)  # one bottleneck block per stage: ResNet-14
    batches: tuple[int, ...] = (256, 1024, 4096)
    clippings: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16)  # the paper's grid, extended as needed
    max_extensions: int = 3  # λ added at one batch (halving below / doubling above) at most
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: float = 15.0  # at every batch size, as in the paper (which trains 90); sized to the budget
    base_lr: float = 0.1  # the paper's rule: LR = 0.1 × batch/256
    base_batch: int = 256
    warmup_fraction: float = 5 / 90  # the paper: 5 warmup epochs of 90
    microbatch: int = 256
    num_train: int | None = None  # None: all 60,000 (--quick: fewer)
    fast_compile: bool = False  # True: compile fast, run slowly (--quick)


@dataclasses.dataclass(frozen=True)
class NfVsBnSettings:
    image_size: int = 14
    widths: tuple[int, ...] = (32, 64, 128, 128)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    stem_channels: tuple[int, ...] = (8, 16, 16, 16)
    group_size: int = 16
    batch: int = 128
    base_lr: float = 0.4  # per 256 examples, as configs/fashion_mnist.py
    epochs: float = 5.0
    seeds: tuple[int, ...] = (0, 1, 2)
    clipping: float = 0.16  # the NF model's AGC (configs/fashion_mnist.py); the BN model trains without
    repeats: int = 5
    steps_per_repeat: int = 20
    num_train: int | None = None
    fast_compile: bool = False


@dataclasses.dataclass(frozen=True)
class CostSettings:
    f0_image_size: int = 192
    f0_batch: int = 10  # 20 % of it is 2 whole images
    f0_kwargs: tuple[tuple[str, Any], ...] = ()  # F0 as published
    f0_repeats: int = 7
    f0_steps_per_repeat: int = 1
    small: NfVsBnSettings | None = NfVsBnSettings()  # None: F0 only
    small_batch: int = 100  # 20 % of it is 20 images
    small_repeats: int = 7
    small_steps_per_repeat: int = 20
    variants: tuple[str, ...] = ("plain", "AGC", "AGC + modified SAM (20%, unsynced)", "AGC + full SAM")


@dataclasses.dataclass(frozen=True)
class SppSettings:
    models: tuple[str, ...] = ("nfnet_f0", "nf_regnet_b0")
    resolution: int = 128
    batch: int = 8
    # Per model, (name, value) pairs for `models.create` (none: the published variant).
    model_kwargs: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    correlation_px: float = 4.0
    resnets: tuple[str, ...] = ("nf_resnet50", "bn_resnet50")  # the NF-ResNet paper's Fig. 1 pair
    resnet_kwargs: tuple[tuple[str, Any], ...] = ()


_TINY_NFNET = NfVsBnSettings(image_size=14, widths=(16, 16, 32, 32), stem_channels=(4, 4, 8, 8), group_size=8,
                             batch=32, epochs=0.5, seeds=(0,), repeats=2, steps_per_repeat=2, num_train=1024,
                             fast_compile=True)
# `agc_steps`: the study's largest batch trained for the step count of a smaller batch of `agc`
# (4096 for 60 epochs = batch 1024's 879 steps at 15), so that "large batch" is not "too few steps".
FULL = {
    "agc": AgcSettings(),
    "agc_steps": AgcSettings(batches=(4096,), epochs=60.0),  # section 1's λ grid, so its best λ is run here
    "nf_vs_bn": NfVsBnSettings(),
    "cost": CostSettings(),
    "spp": SppSettings(),
}
QUICK = {
    "agc": AgcSettings(width=0.125, batches=(64, 128), clippings=(0.04, 0.16), max_extensions=1, seeds=(0,),
                       epochs=1.0, microbatch=64, num_train=1024, fast_compile=True),
    "agc_steps": AgcSettings(width=0.125, batches=(128,), clippings=(0.04, 0.16), max_extensions=1, seeds=(0,),
                             epochs=2.0, microbatch=64, num_train=1024, fast_compile=True),  # batch 64's steps
    "nf_vs_bn": _TINY_NFNET,
    "cost": CostSettings(f0_image_size=32, f0_batch=5, f0_repeats=2,
                         f0_kwargs=(("depths", (1, 1, 1, 1)), ("widths", (16, 16, 32, 32)), ("group_size", 8),
                                    ("stem_channels", (4, 4, 8, 8))),
                         small=None, variants=("plain", "AGC", "AGC + modified SAM (20%, unsynced)")),
    "spp": SppSettings(resolution=32, batch=4, correlation_px=2.0,
                       model_kwargs=(("nfnet_f0", (("depths", (1, 1, 1, 1)), ("widths", (16, 16, 32, 32)),
                                                   ("group_size", 8), ("stem_channels", (4, 4, 8, 8)))),),
                       resnet_kwargs=(("width", 0.125), ("depths", (1, 1, 1, 1)))),
}


# ---------------------------------------------------------------- provenance and progress

def versions() -> dict[str, str]:
    """Python and package versions, the machine and the git commit, flattened for the page from
    the project's provenance record (nfnets_jax/runtime/provenance.py), plus the load at start."""
    from nfnets_jax.runtime import provenance  # pylint: disable=import-outside-toplevel

    record = provenance.collect(devices=False)
    found = {"python": record["machine"]["python"]}
    found.update({name: version or "not installed" for name, version in record["versions"].items()})
    machine = record["machine"]
    found["machine"] = f"{machine['machine']}, {machine['cpu_count']} CPUs, {platform.system()}"
    git = record["git"] or {}
    found["git_commit"] = provenance.short_commit(git) + ("+changes" if git.get("dirty") else "")
    try:
        found["load_average_at_start"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        pass
    return found


class Progress:
    """A one-line progress bar on stderr with the time left, from the share of estimated work
    done so far (each claim announces its work in units of roughly equal cost)."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.total = self.done = 0.0
        self.start = time.perf_counter()

    def add(self, units: float) -> None:
        self.total += units

    def advance(self, units: float, label: str) -> None:
        self.done += units
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        elapsed = time.perf_counter() - self.start
        left = elapsed / fraction - elapsed if fraction > 0 else math.nan
        bar = "#" * int(round(fraction * self.width))
        self.stream.write(f"\r[{bar:<{self.width}}] {100 * fraction:5.1f}%  {_minutes(elapsed)} elapsed, "
                          f"~{_minutes(left)} left  {label[:60]:<60}")
        self.stream.flush()
        if fraction >= 1.0:
            self.stream.write("\n")


def _minutes(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _write_json(path: str, record: dict[str, Any]) -> str:
    """Writes `record` to `path` atomically (`runtime.workdir.write_text_atomically`)."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    from nfnets_jax.runtime import workdir  # pylint: disable=import-outside-toplevel

    workdir.write_text_atomically(epath.Path(path), json.dumps(record, indent=1, default=float))
    return path


# ---------------------------------------------------------------- runs: one file each, resumable

def settings_key(settings: Any, fields: Sequence[str]) -> str:
    """8 hex digits naming the settings `fields` that change what a run computes: runs cached
    under another key are never mistaken for these."""
    chosen = {name: getattr(settings, name) for name in fields}
    return hashlib.sha256(json.dumps(_jsonable(chosen), sort_keys=True).encode()).hexdigest()[:8]


def cached_run(path: str, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(record, computed): the record in `path` if a finished run left it, else `compute()`
    written there atomically (a killed process leaves no half-written file)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f), False
    record = compute()
    _write_json(path, record)
    return record, True


def _load_data(settings: Any):
    from nfnets_jax.analysis import in_memory_training  # pylint: disable=import-outside-toplevel

    data = in_memory_training.load_fashion_mnist(settings.image_size)
    if settings.num_train is not None:  # --quick: a deterministic subset
        data = dataclasses.replace(data, train_images=data.train_images[:settings.num_train],
                                   train_labels=data.train_labels[:settings.num_train],
                                   test_images=data.test_images[:settings.num_train],
                                   test_labels=data.test_labels[:settings.num_train])
    return data


def seed_summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) over all seeds, and, beside
    them, the paper's aggregate: the mean of the best n−1 of n when n ≥ 3."""
    values = [float(v) for v in values]
    best = sorted(values, reverse=True)[:-1] if len(values) >= 3 else values
    return {"per_seed": values, "n": len(values), "mean": float(np.mean(values)),
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "best_n_minus_1_mean": float(np.mean(best))}


def differs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a − b in mean, and whether it exceeds the seed spread: |a − b| > sd(a) + sd(b)."""
    difference = a["mean"] - b["mean"]
    spread = a["sd"] + b["sd"]
    return {"difference": difference, "spread": spread, "exceeds_spread": bool(abs(difference) > spread)}


def next_clipping(means: dict[float, float], factor: float = 2.0) -> float | None:
    """The λ to add so that the best finite λ of `means` (λ -> mean accuracy) is bracketed: half
    the smallest when the best is the smallest, twice the largest when it is the largest, None
    when a smaller and a larger λ both score lower (or fewer than 2 λ were run)."""
    grid = sorted(c for c in means if math.isfinite(c))
    if len(grid) < 2:
        return None
    best = max(grid, key=lambda c: means[c])
    if best == grid[0]:
        return grid[0] / factor
    if best == grid[-1]:
        return grid[-1] * factor
    return None


# ---------------------------------------------------------------- claim 1: AGC vs batch size

_AGC_RUN_FIELDS = ("image_size", "width", "depths", "epochs", "base_lr", "base_batch", "warmup_fraction",
                   "microbatch", "num_train")


def agc_clip_groups(settings: AgcSettings) -> dict[str, str]:
    """Stage label -> regex of the NF-ResNet's conv weights in that stage (`models.stage_regexes`;
    the head is left out: AGC never clips the classifier weight)."""
    from nfnets_jax import models  # pylint: disable=import-outside-toplevel

    regexes = models.stage_regexes("nf_resnet50", depths=settings.depths)
    return {label: regex + r"(?:.*/)?w$" for label, regex in regexes.items() if label != "head"}


def run_agc(settings: AgcSettings, out: str, progress: Progress,
            save_partial: Callable[[dict[str, Any]], None] | None = None, name: str = "agc") -> dict[str, Any]:
    """The study, batch by batch; after each batch but the last, `save_partial(record)` if given
    (`main` writes the JSON and the page), so that a stopped study leaves its finished batches on
    the page. `name` names the figure."""
    from nfnets_jax.analysis import agc_study, in_memory_training as imt  # pylint: disable=import-outside-toplevel
    from nfnets_jax import models  # pylint: disable=import-outside-toplevel

    data = _load_data(settings)
    num_train = len(data.train_labels)
    depth = 3 * sum(settings.depths) + 2
    runs_dir = os.path.join(out, "runs", f"agc-{settings_key(settings, _AGC_RUN_FIELDS)}")
    os.makedirs(runs_dir, exist_ok=True)
    trainers: dict[str, Any] = {}

    def trainer(model: str):
        if model not in trainers:
            kwargs = dict(width=settings.width, depths=settings.depths)
            if model == "nf":
                forward = models.make_forward("nf_resnet50", imt.NUM_CLASSES, dict(kwargs, stochdepth_rate=0.0))
                groups = agc_clip_groups(settings)
            else:
                forward, groups = models.make_forward("bn_resnet50", imt.NUM_CLASSES, kwargs), None
            trainers[model] = imt.RunTrainer(forward, data, microbatch=settings.microbatch, chunk_size=1,
                                             fast_compile=settings.fast_compile, clip_groups=groups)
        return trainers[model]

    records: list[dict[str, Any]] = []

    def run_point(model: str, clipping: float, batch: int) -> list[dict[str, Any]]:
        steps = imt.steps_for_epochs(settings.epochs, batch, num_train)
        lr = settings.base_lr * batch / settings.base_batch
        warmup = int(round(settings.warmup_fraction * steps)) if steps > 1 else 0
        stored = None if model == "bn" else (0.0 if math.isinf(clipping) else clipping)
        point = agc_study.StudyPoint(model, depth, batch, stored)
        found = []
        for seed in settings.seeds:
            name = agc_study.run_name(point, seed)

            def compute(seed=seed, name=name):
                start = time.perf_counter()
                result = trainer(model).train([imt.RunSpec(seed, clipping, batch, steps, lr, warmup)])[0]
                return {"name": name, "series": point.series, "model": model, "clipping": stored, "batch": batch,
                        "seed": seed, "lr": lr, "steps": steps, "warmup_steps": warmup,
                        "seconds": round(time.perf_counter() - start, 2), **result}

            record, computed = cached_run(os.path.join(runs_dir, f"{name}.json"), compute)
            progress.advance(settings.epochs if computed else 0.0, f"agc: {name}")
            found.append(record)
        records.extend(found)
        return found

    for batch in settings.batches:
        run_point("bn", NO_CLIPPING, batch)
        run_point("nf", NO_CLIPPING, batch)
        means = {}
        for clipping in settings.clippings:
            means[clipping] = float(np.mean([r["test_acc"] for r in run_point("nf", clipping, batch)]))
        for _ in range(settings.max_extensions):
            extra = next_clipping(means)
            if extra is None:
                break
            progress.add(len(settings.seeds) * settings.epochs)
            means[extra] = float(np.mean([r["test_acc"] for r in run_point("nf", extra, batch)]))
        record = summarize_agc(settings, records, out, depth=depth, num_train=num_train, name=name)
        if batch != settings.batches[-1]:
            if save_partial is not None:
                save_partial(record | {"complete": False})
    return record | {"complete": True}


def summarize_agc(settings: AgcSettings, records: list[dict[str, Any]], out: str, *, depth: int,
                  num_train: int, name: str = "agc") -> dict[str, Any]:
    """Per (series, batch): the seeds' accuracy (mean ± sd over all seeds, best n−1 beside),
    divergence, final loss and clip fractions; the sub-claims' verdicts; the figure."""
    by_point: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        by_point.setdefault((r["series"], r["batch"]), []).append(r)
    rows = []
    for (series, batch), runs in by_point.items():
        first = runs[0]
        row = {"series": series, "model": first["model"], "clipping": first["clipping"], "batch": batch,
               "depth": depth, "steps": first["steps"], "lr": first["lr"],
               "accuracy": seed_summary([r["test_acc"] for r in runs]),
               "diverged_fraction": float(np.mean([r["diverged"] for r in runs])),
               "final_loss": seed_summary([r["final_loss"] for r in runs]),
               "seconds_per_run": float(np.mean([r["seconds"] for r in runs]))}
        for kind in ("clip_fraction", "clip_fraction_early"):
            stages = sorted(k.split("/", 1)[1] for k in first if k.startswith(kind + "/"))
            if stages and first["model"] == "nf" and first["clipping"]:
                row[kind] = {stage: float(np.mean([r[f"{kind}/{stage}"] for r in runs])) for stage in stages}
        row["top_1_acc"] = {"mean": row["accuracy"]["mean"], "std": row["accuracy"]["sd"]}  # for plot_figure
        rows.append(row)
    rows.sort(key=lambda r: (r["batch"], r["model"] == "bn", not r["clipping"], r["clipping"] or 0.0))
    batches = sorted({r["batch"] for r in rows})
    png = _agc_figure(rows, os.path.join(out, f"{name}.png"), settings, depth, f"{settings.epochs:g} epochs at every batch")
    return {"settings": dataclasses.asdict(settings), "paper": PAPER["agc"], "depth": depth, "num_train": num_train,
            "batches_done": batches, "rows": rows, "runs": records,
            "run_minutes_total": sum(r["seconds"] for r in records) / 60,  # stored runs included
            "figures": [png]}


def _agc_figure(rows: Sequence[dict[str, Any]], png_path: str, settings: AgcSettings, depth: int,
                length: str) -> str:
    """Accuracy against batch size per λ, BN and no AGC (`agc_study.plot_figure`); `length` says
    how long each batch trained."""
    from nfnets_jax.analysis import agc_study  # pylint: disable=import-outside-toplevel
    return agc_study.plot_figure(
        rows, png_path, y_span=40.0, dataset="Fashion-MNIST test",
        title=(f"AGC λ vs batch size, Fashion-MNIST {settings.image_size}px, ResNet-{depth} width {settings.width:g}, "
               f"LR {settings.base_lr:g}×batch/{settings.base_batch}\n{length}\n"
               f"each point: mean ± sd over {len(settings.seeds)} seeds; ▼: below the axis"))


def run_agc_steps(settings: AgcSettings, out: str, progress: Progress) -> dict[str, Any]:
    """`agc_steps`: the largest batch at a smaller batch's step count; judged against that batch's
    rows of the `agc` study in `out` (`agc.json`, which `main` requires before any work), and
    drawn beside them."""
    record = run_agc(settings, out, progress, name="agc_steps")
    with open(os.path.join(out, "agc.json"), encoding="utf-8") as f:
        study = json.load(f)
    merged = equal_steps_record(record, study)
    steps = ", ".join(map(str, sorted({r["steps"] for r in merged["rows"]})))
    length = (f"{steps} steps at every batch ({', '.join(map(str, merged['reference_batches']))}: "
              f"{study['settings']['epochs']:g} epochs; {', '.join(map(str, record['batches_done']))}: "
              f"{settings.epochs:g})")
    png = _agc_figure(merged["reference_rows"] + merged["rows"], os.path.join(out, "agc_steps.png"), settings,
                      record["depth"], length)
    return merged | {"figures": [png]}


def equal_steps_record(record: dict[str, Any], study: dict[str, Any]) -> dict[str, Any]:
    """`record` (one or more batches trained for a common step count) beside the rows of the
    `study` batch with that same step count; its verdicts (`VERDICTS['agc_steps']`) are
    `agc_verdicts` over both, so the design check compares the BN-ResNet at two batch sizes with
    equal steps."""
    steps = {r["steps"] for r in record["rows"]}
    own = {r["batch"] for r in record["rows"]}
    reference = [r for r in study["rows"] if r["steps"] in steps and r["batch"] not in own]
    reference_batches = sorted({r["batch"] for r in reference})
    return record | {"reference_batches": reference_batches, "reference_rows": reference,
                     "reference_command": study.get("command")}


def _row(rows: Sequence[dict[str, Any]], series: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["series"] == series and r["batch"] == batch), None)


def best_clipping_rows(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per batch, the NF row with AGC whose mean accuracy is highest."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["model"] == "nf" and r["clipping"]:
            if r["batch"] not in best or r["accuracy"]["mean"] > best[r["batch"]]["accuracy"]["mean"]:
                best[r["batch"]] = r
    return best


AT_CHANCE = 0.15  # test top-1 below 1.5× chance (10 classes): the run did not train, diverged or not


def agc_verdicts(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The paper's three sub-claims of Fig. 2, each 'yes' / 'partly' / 'no' with its numbers.
    A difference "exceeds the seed spread" when |Δmean| > sd₁ + sd₂ (`differs`).

    - unclipped_degrades: the NF-ResNet without AGC loses accuracy from the smallest batch to the
      largest (yes: by more than the spread; partly: by less; no: it does not lose).
    - agc_matches_bn: at each batch, the best λ against BN (matches: NF ≥ BN, or the gap is within
      the spread). yes: at every batch; partly: at some, or at none but the gap shrinks; no: none.
    - bn_across_batches (not a claim of the paper: a check of the design): the BN-ResNet, which
      needs no clipping, at the smallest and the largest batch; `enough_steps` when it does not
      lose more than the spread, i.e. the largest batch's step count suffices to train.
    - smaller_lambda_at_larger_batch: the best λ per batch. yes: it never grows with the batch,
      is smaller at the largest batch than at the smallest, and there the small batch's best λ
      scores lower by more than the spread; partly: the order holds but that difference is within
      the spread, that λ was not run at the largest batch, or the order holds only end to end;
      no: the best λ does not shrink.
    - unclipped_degrades is 'not tested' when the unclipped NF-ResNet is already at chance (every
      seed) at the smallest batch of `rows`; the smallest batch's no-AGC vs best-λ comparison is
      made only where unclipped training trained and never diverged there.
    """
    batches = sorted({r["batch"] for r in rows})
    verdicts: dict[str, Any] = {"batches": batches}
    if len(batches) < 2:
        return verdicts
    small, large = batches[0], batches[-1]
    best = best_clipping_rows(rows)
    bracketed = {}
    for batch in batches:
        grid = sorted(r["clipping"] for r in rows if r["batch"] == batch and r["model"] == "nf" and r["clipping"])
        if batch in best:
            bracketed[batch] = bool(grid and grid[0] < best[batch]["clipping"] < grid[-1])
    verdicts["chance_threshold"] = AT_CHANCE
    verdicts["at_chance"] = {b: {r["series"]: float(np.mean([a < AT_CHANCE for a in r["accuracy"]["per_seed"]]))
                                 for r in rows if r["batch"] == b} for b in batches}
    verdicts["best_clipping"] = {b: best[b]["clipping"] for b in best}
    verdicts["bracketed"] = bracketed

    bn_small, bn_large = _row(rows, "BN", small), _row(rows, "BN", large)
    if bn_small and bn_large:  # is the largest batch's step count enough to train at all?
        change = differs(bn_small["accuracy"], bn_large["accuracy"])
        verdicts["bn_across_batches"] = {
            **change, "small_batch": small, "large_batch": large, "steps_small": bn_small["steps"],
            "steps_large": bn_large["steps"], "mean_small": bn_small["accuracy"]["mean"],
            "mean_large": bn_large["accuracy"]["mean"],
            "enough_steps": bool(change["difference"] <= 0 or not change["exceeds_spread"])}

    no_agc_small, no_agc_large = _row(rows, "no AGC", small), _row(rows, "no AGC", large)
    # Without AGC at the smallest batch: did every seed train (above chance) and none diverge?
    no_agc_trains_small = bool(no_agc_small and verdicts["at_chance"][small][no_agc_small["series"]] == 0
                               and no_agc_small["diverged_fraction"] == 0)
    if no_agc_small and no_agc_large:
        change = differs(no_agc_small["accuracy"], no_agc_large["accuracy"])
        if verdicts["at_chance"][small][no_agc_small["series"]] == 1:
            answer = "not tested"  # it fails already at the smaller batch: nothing left to degrade
        else:
            answer = "no" if change["difference"] <= 0 else ("yes" if change["exceeds_spread"] else "partly")
        verdicts["unclipped_degrades"] = {
            "answer": answer, "small_batch": small, "large_batch": large, **change,
            "mean_small": no_agc_small["accuracy"]["mean"], "mean_large": no_agc_large["accuracy"]["mean"],
            "diverged_small": no_agc_small["diverged_fraction"], "diverged_large": no_agc_large["diverged_fraction"]}

    if no_agc_trains_small and small in best:  # where nothing diverges, what does clipping cost?
        verdicts["no_agc_vs_best_clipping_at_smallest_batch"] = {
            **differs(no_agc_small["accuracy"], best[small]["accuracy"]), "batch": small,
            "clipping": best[small]["clipping"], "no_agc_mean": no_agc_small["accuracy"]["mean"],
            "agc_mean": best[small]["accuracy"]["mean"]}

    gaps = {}
    for batch in batches:
        bn = _row(rows, "BN", batch)
        if bn and batch in best:
            gap = differs(bn["accuracy"], best[batch]["accuracy"])  # BN − NF
            gap["matches"] = bool(gap["difference"] <= 0 or not gap["exceeds_spread"])
            gap["bn_mean"], gap["nf_mean"] = bn["accuracy"]["mean"], best[batch]["accuracy"]["mean"]
            gap["clipping"] = best[batch]["clipping"]
            gaps[batch] = gap
    if gaps:
        matched = [b for b, g in gaps.items() if g["matches"]]
        answer = "yes" if len(matched) == len(gaps) else ("partly" if matched else "no")
        verdicts["agc_matches_bn"] = {"answer": answer, "by_batch": gaps, "matched_batches": matched,
                                      "largest_batch_matches": bool(gaps.get(large, {}).get("matches", False))}

    if small in best and large in best:
        lambdas = [best[b]["clipping"] for b in batches if b in best]
        monotone = all(a >= b for a, b in zip(lambdas, lambdas[1:]))
        shrinks = lambdas[-1] < lambdas[0]
        small_lambda_at_large = next((r for r in rows if r["batch"] == large and r["model"] == "nf"
                                      and r["clipping"] == best[small]["clipping"]), None)
        entry: dict[str, Any] = {"best_by_batch": dict(zip([b for b in batches if b in best], lambdas)),
                                 "monotone": monotone, "shrinks": shrinks}
        entry.update(small_batch_clipping=best[small]["clipping"], large_batch_clipping=best[large]["clipping"])
        if not shrinks:
            answer = "no"
        elif small_lambda_at_large is None:  # the order holds; what the small batch's λ costs there is unmeasured
            answer = "partly"
        else:
            penalty = differs(best[large]["accuracy"], small_lambda_at_large["accuracy"])
            entry["penalty"] = penalty
            answer = "yes" if monotone and penalty["exceeds_spread"] else "partly"
        entry["answer"] = answer
        verdicts["smaller_lambda_at_larger_batch"] = entry

    if large in best and "clip_fraction" in best[large]:
        verdicts["clipping_at_largest_batch"] = {
            "clipping": best[large]["clipping"], "mean": best[large]["clip_fraction"],
            "early": best[large].get("clip_fraction_early", {}),
            "no_agc_diverged": no_agc_large["diverged_fraction"] if no_agc_large else None,
            "agc_at_chance": {r["series"]: verdicts["at_chance"][large][r["series"]] for r in rows
                              if r["batch"] == large and r["model"] == "nf" and r["clipping"]},
            "best_diverged": best[large]["diverged_fraction"],
            "agc_diverged": {r["series"]: r["diverged_fraction"] for r in rows
                             if r["batch"] == large and r["model"] == "nf" and r["clipping"]}}
    return verdicts


# ---------------------------------------------------------------- claim 2: NF vs BN

_NF_VS_BN_RUN_FIELDS = ("image_size", "widths", "depths", "stem_channels", "group_size", "batch", "base_lr",
                        "epochs", "clipping", "num_train")


def _nfnet_kwargs(settings: NfVsBnSettings, norm: str) -> dict[str, Any]:
    return dict(depths=settings.depths, widths=settings.widths, stem_channels=settings.stem_channels,
                group_size=settings.group_size, stochdepth_rate=0.0, drop_rate=0.0, norm=norm)


def run_nf_vs_bn(settings: NfVsBnSettings, out: str, progress: Progress) -> dict[str, Any]:
    from nfnets_jax.analysis import in_memory_training as imt, step_cost  # pylint: disable=import-outside-toplevel
    from nfnets_jax import models  # pylint: disable=import-outside-toplevel

    data = _load_data(settings)
    num_train = len(data.train_labels)
    steps = imt.steps_for_epochs(settings.epochs, settings.batch, num_train)
    lr = settings.base_lr * settings.batch / 256
    images, labels = _channels(data.train_images[:settings.batch]), data.train_labels[:settings.batch]
    compiled = []
    for norm in ("none", "batchnorm"):
        forward = models.make_forward("nfnet_f0", imt.NUM_CLASSES, _nfnet_kwargs(settings, norm))
        variant = step_cost.StepVariant("NF" if norm == "none" else "BN")
        compiled.append(step_cost.compile_step(forward, variant, images=images, labels=labels, num_classes=10))
        progress.advance(20, f"nf_vs_bn: compiled the {variant.name} step")
    timings = step_cost.time_interleaved(compiled, repeats=settings.repeats,
                                         steps_per_repeat=settings.steps_per_repeat,
                                         on_repeat=lambda i: progress.advance(2, f"nf_vs_bn: timing {i + 1}"))
    runs_dir = os.path.join(out, "runs", f"nf_vs_bn-{settings_key(settings, _NF_VS_BN_RUN_FIELDS)}")
    os.makedirs(runs_dir, exist_ok=True)
    accuracy: dict[str, Any] = {}
    for norm, name, clipping in (("none", "NF", settings.clipping), ("batchnorm", "BN", NO_CLIPPING)):
        trainer = None
        results = []
        for seed in settings.seeds:
            def compute(seed=seed, norm=norm, clipping=clipping):
                nonlocal trainer
                if trainer is None:
                    forward = models.make_forward("nfnet_f0", imt.NUM_CLASSES, _nfnet_kwargs(settings, norm))
                    trainer = imt.RunTrainer(forward, data,
                                             microbatch=settings.batch, chunk_size=1,
                                             fast_compile=settings.fast_compile)
                warmup = int(round(steps * 5 / 90)) if steps > 1 else 0
                start = time.perf_counter()
                result = trainer.train([imt.RunSpec(seed, clipping, settings.batch, steps, lr, warmup)])[0]
                return {"seed": seed, "seconds": round(time.perf_counter() - start, 2), **result}

            record, computed = cached_run(os.path.join(runs_dir, f"{name}_s{seed}.json"), compute)
            results.append(record)
            progress.advance(settings.epochs if computed else 0.0, f"nf_vs_bn: trained {name} seed {seed}")
        accuracy[name] = seed_summary([r["test_acc"] for r in results]) | {
            "diverged": [r["diverged"] for r in results], "agc_clipping": None if math.isinf(clipping) else clipping}
    rows = {step.name: {"step_time": timings[step.name], "memory": step.memory.as_record(),
                        "compile_seconds": step.compile_seconds, "accuracy": accuracy[step.name]}
            for step in compiled}
    per_repeat = [bn / nf for bn, nf in zip(timings["BN"]["per_repeat_s"], timings["NF"]["per_repeat_s"])]
    png = _bar_figure(
        os.path.join(out, "nf_vs_bn.png"),
        {"train step (ms, median)": {n: 1e3 * r["step_time"]["median_s"] for n, r in rows.items()},
         "compiled step peak memory (MiB)": {n: r["memory"]["peak_estimate"] / 2**20 for n, r in rows.items()},
         "Fashion-MNIST test top-1 (%), mean": {n: 100 * r["accuracy"]["mean"] for n, r in rows.items()}},
        f"NFNet architecture, NF vs BatchNorm (Fashion-MNIST {settings.image_size}px, batch {settings.batch})")
    record = {"settings": dataclasses.asdict(settings), "steps": steps, "lr": lr, "num_train": num_train,
              "results": rows,
              "time_ratio_bn_over_nf": rows["BN"]["step_time"]["median_s"] / rows["NF"]["step_time"]["median_s"],
              "time_ratio_per_repeat": per_repeat,
              "memory_ratio_bn_over_nf": rows["BN"]["memory"]["peak_estimate"] / rows["NF"]["memory"]["peak_estimate"],
              "figures": [png]}
    return record


def nf_vs_bn_verdicts(record: dict[str, Any]) -> dict[str, Any]:
    """Accuracy NF − BN against the seed spread (`differs`); step time BN / NF by the median and
    per interleaved repeat (how many repeats have BN slower: 'consistent' when all or none)."""
    ratios = record["time_ratio_per_repeat"]
    slower = sum(r > 1 for r in ratios)
    return {"accuracy": differs(record["results"]["NF"]["accuracy"], record["results"]["BN"]["accuracy"]),
            "time": {"median_ratio": record["time_ratio_bn_over_nf"], "repeats_bn_slower": slower,
                     "repeats": len(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
                     "consistent": slower in (0, len(ratios))},
            "memory_ratio": record["memory_ratio_bn_over_nf"]}


def _channels(images: np.ndarray) -> np.ndarray:
    """Grey [N, H, W, 1] as the 3 channels the step-cost programs are compiled for."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


# ---------------------------------------------------------------- claim 3: the cost of AGC and SAM

def cost_variants(names: Sequence[str] | None = None) -> list:
    """The timed steps (all four, or those named): plain, AGC λ = 0.01, AGC + the paper's
    modified SAM, AGC + full SAM."""
    from nfnets_jax.analysis import step_cost  # pylint: disable=import-outside-toplevel

    variants = [step_cost.StepVariant("plain"), step_cost.StepVariant("AGC", clipping=0.01),
                step_cost.StepVariant("AGC + modified SAM (20%, unsynced)", clipping=0.01, sam_ascent_fraction=0.2),
                step_cost.StepVariant("AGC + full SAM", clipping=0.01, sam_ascent_fraction=1.0)]
    return [v for v in variants if names is None or v.name in names]


def _per_repeat_ratios(timings: dict[str, Any], baseline: str) -> dict[str, list[float]]:
    base = timings[baseline]["per_repeat_s"]
    return {name: [t / b for t, b in zip(timing["per_repeat_s"], base)] for name, timing in timings.items()}


def _time_variants(label: str, forward, images, labels, repeats: int, steps_per_repeat: int,
                   progress: Progress, variants: Sequence[str]) -> dict[str, Any]:
    from nfnets_jax.analysis import step_cost  # pylint: disable=import-outside-toplevel

    compiled = []
    for variant in cost_variants(variants):
        compiled.append(step_cost.compile_step(forward, variant, images=images, labels=labels, num_classes=10))
        progress.advance(10, f"cost: compiled {label} {variant.name}")
    timings = step_cost.time_interleaved(compiled, repeats=repeats, steps_per_repeat=steps_per_repeat,
                                         on_repeat=lambda i: progress.advance(5, f"cost: {label} round {i + 1}"))
    batch = int(images.shape[0])
    return {"timings": timings, "ratio_to_plain": step_cost.ratios(timings, "plain"),
            "ratio_to_agc": step_cost.ratios(timings, "AGC"),
            "per_repeat_ratio_to_plain": _per_repeat_ratios(timings, "plain"),
            "per_repeat_ratio_to_agc": _per_repeat_ratios(timings, "AGC"),
            "compile_seconds": {step.name: step.compile_seconds for step in compiled},
            "memory": {step.name: step.memory.as_record() for step in compiled},
            "memory_ratio_to_plain": {step.name: step.memory.peak_bytes / compiled[0].memory.peak_bytes
                                      for step in compiled},
            "batch": batch, "ascent_images": (ascent := int(math.floor(PAPER["cost"]["ascent_fraction"] * batch))),
            "ascent_share": ascent / batch,
            "image_size": int(images.shape[1]), "repeats": repeats, "steps_per_repeat": steps_per_repeat}


def run_cost(settings: CostSettings, out: str, progress: Progress) -> dict[str, Any]:
    from nfnets_jax.analysis import in_memory_training as imt  # pylint: disable=import-outside-toplevel
    from nfnets_jax import models  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    f0_images = rng.standard_normal((settings.f0_batch, settings.f0_image_size, settings.f0_image_size, 3),
                                    dtype=np.float32)
    f0_labels = rng.integers(0, 10, settings.f0_batch)
    f0 = models.make_forward("nfnet_f0", imt.NUM_CLASSES, dict(settings.f0_kwargs))
    results = {"F0": _time_variants("F0", f0, f0_images, f0_labels, settings.f0_repeats,
                                    settings.f0_steps_per_repeat, progress, settings.variants)}
    small = settings.small
    if small is not None:
        data = _load_data(small)
        model = models.make_forward("nfnet_f0", imt.NUM_CLASSES, _nfnet_kwargs(small, "none"))
        results["Fashion-MNIST NFNet"] = _time_variants(
            "Fashion-MNIST", model, _channels(data.train_images[:settings.small_batch]),
            data.train_labels[:settings.small_batch], settings.small_repeats, settings.small_steps_per_repeat,
            progress, settings.variants)
    png = _bar_figure(os.path.join(out, "cost.png"),
                      {f"{name}: step time / plain step": result["ratio_to_plain"] for name, result in results.items()},
                      "Cost of AGC and SAM per train step (median of interleaved repeats)", reference=1.0)
    return {"settings": _jsonable(dataclasses.asdict(settings)), "paper": PAPER["cost"], "results": results,
            "figures": [png]}


def cost_verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Per model: AGC over plain and modified SAM over AGC against the targets, by the median and
    by each interleaved repeat (how many repeats meet the target)."""
    targets = {"AGC": ("plain", PAPER["cost"]["agc_target"]),
               "AGC + modified SAM (20%, unsynced)": ("AGC", PAPER["cost"]["modified_sam_target"])}
    verdicts = {}
    for model, result in results.items():
        entry = {}
        for variant, (baseline, target) in targets.items():
            median = result[f"ratio_to_{baseline.lower()}"][variant]
            repeats = result[f"per_repeat_ratio_to_{baseline.lower()}"][variant]
            met = sum(r <= target for r in repeats)
            entry[variant] = {"baseline": baseline, "target": target, "median_ratio": median,
                              "min_ratio": min(repeats), "max_ratio": max(repeats), "repeats_met": met,
                              "repeats": len(repeats),
                              "answer": "yes" if met == len(repeats) else ("partly" if median <= target else "no")}
        verdicts[model] = entry
    return verdicts


# ---------------------------------------------------------------- claim 4: signal propagation

SPP_TRACKING_FACTOR = 2.0  # "tracks 1 + kα²": every block's variance within this factor of it


def fashion_probe(batch: int, resolution: int) -> np.ndarray:
    """The first `batch` Fashion-MNIST test images, bilinearly resized to `resolution` px, grey
    replicated to RGB, standardised per channel over the batch (as the white-noise probe is)."""
    import jax  # pylint: disable=import-outside-toplevel
    from nfnets_jax.data import fashion_mnist  # pylint: disable=import-outside-toplevel

    images, _ = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "test")  # FileNotFoundError: the fix
    grey = np.asarray(jax.image.resize(images[:batch].astype(np.float32), (batch, resolution, resolution),
                                       method="linear"))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return ((rgb - rgb.mean(axis=(0, 1, 2))) / rgb.std(axis=(0, 1, 2))).astype(np.float32)


def run_spp(settings: SppSettings, out: str, progress: Progress) -> dict[str, Any]:
    from . import signal_propagation as spp_command  # pylint: disable=import-outside-toplevel
    from nfnets_jax.analysis import signal_propagation  # pylint: disable=import-outside-toplevel

    probes = {"gaussian": signal_propagation.gaussian_images(settings.batch, settings.resolution),
              "smooth": signal_propagation.smooth_images(settings.batch, settings.resolution,
                                                         correlation_px=settings.correlation_px),
              "fashion_mnist": fashion_probe(settings.batch, settings.resolution)}
    titles = {"gaussian": "N(0,1) white noise",
              "smooth": f"image-like (noise smoothed over {settings.correlation_px:g}px)",
              "fashion_mnist": f"Fashion-MNIST test images resized to {settings.resolution}px"}
    results: dict[str, Any] = {"resnets": {}}
    figures = []
    resnets = []
    for name in settings.resnets:  # the NF-ResNet paper's Fig. 1: white noise, NF vs BN
        measured = signal_propagation.measure_probes(name, {"gaussian": probes["gaussian"]},
                                                     **dict(settings.resnet_kwargs))["gaussian"]
        resnets.append(measured)
        results["resnets"][name] = spp_command._summary(measured) | {"curves": measured.to_json()}  # pylint: disable=protected-access
        progress.advance(1, f"spp: {name}, white noise")
    figures.append(spp_command.plot(resnets, os.path.join(out, "spp_resnets.png"),
                                    f"NF-ResNet vs BN-ResNet at init, {titles['gaussian']}, batch {settings.batch}, "
                                    f"{settings.resolution}px (dashed: 1 + kα²)"))
    by_model = {}
    for name in settings.models:  # one compile per model, run on every probe
        kwargs = dict(dict(settings.model_kwargs).get(name, ()))
        by_model[name] = signal_propagation.measure_probes(name, probes, **kwargs)
        progress.advance(len(probes), f"spp: {name}, {', '.join(probes)} inputs")
    results["probes"] = {}
    for probe in probes:
        measured = [by_model[name][probe] for name in settings.models]
        results["probes"][probe] = {r.model: spp_command._summary(r) | {"curves": r.to_json()} for r in measured}  # pylint: disable=protected-access
        figures.append(spp_command.plot(measured, os.path.join(out, f"spp_{probe}.png"),
                                        f"Signal propagation at init, {titles[probe]}, batch {settings.batch}, "
                                        f"{settings.resolution}px, skip gains 1"))
    return {"settings": _jsonable(dataclasses.asdict(settings)), "results": results, "titles": titles,
            "figures": figures}


def _variance_ratio(curves: dict[str, Any]) -> list[float] | None:
    expected = curves.get("expected_variance")
    if not expected:
        return None
    return [v / e for v, e in zip(curves["avg_variance"], expected)]


def spp_verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Per model and probe: the block variance over the analytic 1 + kα² (min, max, last) and
    whether every block is within `SPP_TRACKING_FACTOR` of it; the residual branches' variance
    per stage (mean over the stage's blocks)."""
    verdicts: dict[str, Any] = {"tracking_factor": SPP_TRACKING_FACTOR, "models": {}}
    entries = [("gaussian", name, summary) for name, summary in results["resnets"].items()]
    entries += [(probe, name, summary) for probe, by_model in results["probes"].items()
                for name, summary in by_model.items()]
    for probe, name, summary in entries:
        curves = summary["curves"]
        ratio = _variance_ratio(curves)
        stages = curves["stages"]
        branch = {}
        for stage in sorted(set(stages)):
            values = [v for v, s in zip(curves["branch_variance"], stages) if s == stage]
            branch[str(stage)] = float(np.mean(values))
        entry = {"branch_variance_by_stage": branch, "last_variance": curves["avg_variance"][-1]}
        if ratio is not None:
            entry.update(ratio_min=min(ratio), ratio_max=max(ratio), ratio_last=ratio[-1],
                         tracks=bool(all(1 / SPP_TRACKING_FACTOR <= r <= SPP_TRACKING_FACTOR for r in ratio)))
        verdicts["models"].setdefault(name, {})[probe] = entry
    return verdicts


# ---------------------------------------------------------------- figures and the page

def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _bar_figure(png_path: str, panels: dict[str, dict[str, float]], title: str,
                reference: float | None = None) -> str:
    """One bar panel per entry of `panels` (label -> value), side by side."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False)
    for axis, (panel, values) in zip(axes[0], panels.items()):
        names = list(values)
        bars = axis.bar(range(len(names)), [values[n] for n in names], color="tab:blue")
        axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
        if reference is not None:
            axis.axhline(reference, color="0.4", linestyle="--", linewidth=1)
        axis.set_title(panel, fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# Each claim's verdicts as a function of its stored measurements: what `main` attaches to the
# claim's JSON, and what a test recomputes from the committed JSON (so that stored verdicts
# cannot drift from their rows).
VERDICTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "agc": lambda record: agc_verdicts(record["rows"]),
    "agc_steps": lambda record: agc_verdicts(record["reference_rows"] + record["rows"]),
    "nf_vs_bn": nf_vs_bn_verdicts,
    "cost": lambda record: cost_verdicts(record["results"]),
    "spp": lambda record: spp_verdicts(record["results"]),
}

RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "agc": run_agc, "agc_steps": run_agc_steps, "nf_vs_bn": run_nf_vs_bn, "cost": run_cost, "spp": run_spp}

# The work each claim announces to the progress bar before anything runs: units of roughly
# equal wall time on a CPU (a run-epoch ≈ 1, a compile ≈ 10–20, a timing round ≈ 2–5).
WORK_UNITS: dict[str, Callable[[Any], float]] = {
    "agc": lambda s: len(s.batches) * (len(s.clippings) + 2) * len(s.seeds) * s.epochs,
    "agc_steps": lambda s: len(s.batches) * (len(s.clippings) + 2) * len(s.seeds) * s.epochs,
    "nf_vs_bn": lambda s: 2 * 20.0 + s.repeats * 2 + 2 * len(s.seeds) * s.epochs,
    "cost": lambda s: len(s.variants) * 10.0 + 5 * s.f0_repeats + (0 if s.small is None else
                                                                    len(s.variants) * 10.0 + 5 * s.small_repeats),
    "spp": lambda s: len(s.resnets) + 3.0 * len(s.models),
}


FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_list("only", list(CLAIMS), f"Claims to run, of {','.join(CLAIMS)} (default: all).", flag_values=FLAGS)
flags.DEFINE_bool("quick", False, "Tiny sizes: checks the machinery in a few minutes.", flag_values=FLAGS)
flags.DEFINE_string("out", None, f"Directory for the JSON and PNG files (default: {DEFAULT_OUT}); finished "
                    "training runs are kept under <out>/runs/ and reused by a rerun.", flag_values=FLAGS)
flags.DEFINE_string("doc", None, f"The Markdown page to (re)write from every claim JSON in --out (default: "
                    f"{DEFAULT_DOC} with the default --out, else <out>/reproduction.md).", flag_values=FLAGS)
flags.DEFINE_list("agc_batches", None, "AGC study: batch sizes instead of the setting's (e.g. 256,512,1024,2048,4096).",
                  flag_values=FLAGS)
flags.DEFINE_list("agc_seeds", None, "AGC study: seeds instead of the setting's (e.g. 0,1,2,3,4).", flag_values=FLAGS)
flags.DEFINE_float("agc_epochs", None, "AGC study: epochs at every batch instead of the setting's.", flag_values=FLAGS)


def _int_list(values: Sequence[str] | None, flag: str, minimum: int) -> tuple[int, ...] | None:
    if values is None:
        return None
    try:
        parsed = tuple(int(v) for v in values if v)
    except ValueError:
        command_line.fail(f"--{flag} takes comma-separated integers; got {','.join(values)!r}.")
    if not parsed or min(parsed) < minimum:
        command_line.fail(f"--{flag} takes integers ≥ {minimum}; got {','.join(values)!r}.")
    return parsed


def _agc_overrides(settings: AgcSettings) -> AgcSettings:
    changes: dict[str, Any] = {}
    batches = _int_list(FLAGS.agc_batches, "agc_batches", minimum=1)
    if batches is not None:
        bad = [b for b in batches if b % settings.microbatch]
        if bad:
            command_line.fail(f"--agc_batches: {','.join(map(str, bad))} not a multiple of the microbatch "
                              f"{settings.microbatch}.")
        changes["batches"] = tuple(sorted(batches))
    seeds = _int_list(FLAGS.agc_seeds, "agc_seeds", minimum=0)
    if seeds is not None:
        changes["seeds"] = seeds
    if FLAGS.agc_epochs is not None:
        if not FLAGS.agc_epochs > 0:
            command_line.fail(f"--agc_epochs must be positive; got {FLAGS.agc_epochs}.")
        changes["epochs"] = FLAGS.agc_epochs
    return dataclasses.replace(settings, **changes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False, positional=False)
    args = FLAGS
    claims = [claim for claim in args.only if claim]
    unknown = sorted(set(claims) - set(CLAIMS))
    if unknown or not claims:
        command_line.fail(f"--only takes a comma-separated subset of {','.join(CLAIMS)}; got {','.join(args.only)!r}.")
    settings = dict(QUICK if args.quick else FULL)
    settings["agc"] = _agc_overrides(settings["agc"])
    if {"agc", "nf_vs_bn", "spp"} & set(claims) or "cost" in claims and settings["cost"].small is not None:
        from nfnets_jax.data import fashion_mnist  # pylint: disable=import-outside-toplevel

        message = fashion_mnist.missing_files_message(fashion_mnist.DEBIAN_DIR)
        if message:
            command_line.fail(message)
    out = args.out or DEFAULT_OUT
    if "agc_steps" in claims and "agc" not in claims and not os.path.exists(os.path.join(out, "agc.json")):
        command_line.fail(f"--only agc_steps compares with the agc study's agc.json, which {out} lacks: "
                          "run --only agc,agc_steps (or give the --out of a finished agc study).")
    doc = args.doc or (DEFAULT_DOC if args.out is None else os.path.join(out, "reproduction.md"))
    os.makedirs(out, exist_ok=True)

    from . import reproduction_page  # pylint: disable=import-outside-toplevel

    command = "python -m experiments.reproduce" + (" --quick" if args.quick else "") + \
        ("" if claims == list(CLAIMS) else f" --only {','.join(claims)}") + \
        "".join(f" --{name} {','.join(map(str, value)) if isinstance(value, list) else value}"
                for name in ("agc_batches", "agc_seeds", "agc_epochs")
                if (value := getattr(args, name)) is not None)
    progress = Progress()
    for claim in claims:
        progress.add(WORK_UNITS[claim](settings[claim]))
    written = {}
    for claim in claims:
        start = time.perf_counter()
        provenance = versions()

        def save(record: dict[str, Any], claim: str = claim, start: float = start,
                 provenance: dict[str, str] = provenance) -> str:
            """Writes the claim's JSON with how, where and when it was measured, then the page."""
            load_end = " ".join(f"{v:.1f}" for v in os.getloadavg())
            record = {"complete": True, **record, "verdicts": VERDICTS[claim](record), "claim": claim,
                      "quick": args.quick, "command": command,
                      "seconds": round(time.perf_counter() - start, 1), "versions": provenance,
                      "load_average_at_end": load_end}
            path = _write_json(os.path.join(out, f"{claim}.json"), _jsonable(record))
            reproduction_page.write(out, doc)  # the page holds every claim (part) finished so far
            return path

        extra = {"save_partial": save} if claim == "agc" else {}
        written[claim] = save(RUNNERS[claim](settings[claim], out, progress, **extra))
    page = reproduction_page.write(out, doc)
    summary = {"json": written, "doc": page, "seconds": round(time.perf_counter() - progress.start, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
