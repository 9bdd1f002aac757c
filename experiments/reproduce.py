"""The paper's central claims, reproduced in miniature on data anyone has (docs/reproduction.md).

    python -m experiments.reproduce                       # all four claims, the committed setting
    python -m experiments.reproduce --only agc,cost       # some of them
    python -m experiments.reproduce --quick --out /tmp/r  # tiny sizes: proves the machinery

Claims (each writes `<claim>.json` and PNG figures under `--out`, then the page `--doc` is
rewritten from every claim JSON present in `--out`):

- `agc`: AGC vs batch size (Brock et al. 2021 §4, Fig. 2) — small NF-ResNet and same-depth
  BN-ResNet on the digits, batch 64 → 1024 with the LR scaled linearly, λ ∈ {0.01 … 0.16} and
  no AGC, several seeds: final test top-1 and the fraction of diverged runs.
- `nf_vs_bn`: the same NFNet architecture with and without BatchNorm (§3): step time, XLA's
  peak-memory estimate of the compiled train step, and digits accuracy.
- `cost`: the step time of plain / AGC / modified SAM (20 % ascent, unsynced) / full SAM, on the
  F0 train step (192 px, batch 8, f32) and on the digits model (§4, §6.1).
- `spp`: signal propagation of NFNets and NF-RegNets at init with white-noise and image-like
  inputs (NF-ResNet paper §4).

A progress bar with the time left goes to stderr; one JSON line with the output paths to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from . import command_line

CLAIMS = ("agc", "nf_vs_bn", "cost", "spp")
DEFAULT_OUT = os.path.join("docs", "reproduction")
DEFAULT_DOC = os.path.join("docs", "reproduction.md")


# ---------------------------------------------------------------- settings (full and --quick)

@dataclasses.dataclass(frozen=True)
class AgcSettings:
    image_size: int = 8  # the digits' native resolution
    width: float = 0.25  # NF-/BN-ResNet widths 16…128 channels, stem 4
    depths: tuple[int, ...] = (1, 1, 1, 1)  # one bottleneck block per stage: 14 layers
    batches: tuple[int, ...] = (64, 128, 256, 512, 1024)
    clippings: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: float = 20.0
    base_lr: float = 0.1  # the paper's rule: LR = 0.1 × batch/256 (0.025 at 64 … 0.4 at 1024)
    base_batch: int = 256
    warmup_fraction: float = 5 / 90  # the paper: 5 warmup epochs of 90
    microbatch: int = 64
    fast_compile: bool = False  # True: compile fast, run slowly (--quick)


@dataclasses.dataclass(frozen=True)
class NfVsBnSettings:
    image_size: int = 16
    widths: tuple[int, ...] = (32, 64, 128, 128)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    stem_channels: tuple[int, ...] = (8, 16, 16, 16)
    group_size: int = 16
    batch: int = 64
    lr: float = 0.1
    fast_compile: bool = False
    epochs: float = 10.0
    seeds: tuple[int, ...] = (0, 1, 2)
    clipping: float = 0.04  # the NF model's AGC; the BN model trains without
    repeats: int = 5
    steps_per_repeat: int = 3


@dataclasses.dataclass(frozen=True)
class CostSettings:
    f0_image_size: int = 192
    f0_batch: int = 8
    f0_kwargs: tuple[tuple[str, Any], ...] = ()  # F0 as published
    f0_repeats: int = 3
    f0_steps_per_repeat: int = 1
    digits: NfVsBnSettings | None = NfVsBnSettings()  # None: F0 only (--quick: the same code path)
    digits_repeats: int = 5
    digits_steps_per_repeat: int = 3


@dataclasses.dataclass(frozen=True)
class SppSettings:
    models: tuple[str, ...] = ("nfnet_f0", "nf_regnet_b0")
    resolution: int = 128
    batch: int = 8
    # Per model, (name, value) pairs for `models.create` (none: the published variant).
    model_kwargs: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    correlation_px: float = 4.0


_TINY_NFNET = NfVsBnSettings(image_size=16, widths=(16, 16, 32, 32), stem_channels=(4, 4, 8, 8), group_size=8,
                             batch=16, epochs=0.05, seeds=(0,), repeats=2, steps_per_repeat=1,
                             fast_compile=True)
FULL = {
    "agc": AgcSettings(),
    "nf_vs_bn": NfVsBnSettings(),
    "cost": CostSettings(),
    "spp": SppSettings(),
}
QUICK = {
    "agc": AgcSettings(width=0.125, batches=(64, 128), clippings=(0.04,), seeds=(0,), epochs=0.2, fast_compile=True),
    "nf_vs_bn": _TINY_NFNET,
    "cost": CostSettings(f0_image_size=32, f0_batch=4, f0_repeats=2,
                         f0_kwargs=(("depths", (1, 1, 1, 1)), ("widths", (16, 16, 32, 32)), ("group_size", 8),
                                    ("stem_channels", (4, 4, 8, 8))),
                         digits=None),
    "spp": SppSettings(resolution=32, batch=4, correlation_px=2.0,
                       model_kwargs=(("nfnet_f0", (("depths", (1, 1, 1, 1)), ("widths", (16, 16, 32, 32)),
                                                   ("group_size", 8), ("stem_channels", (4, 4, 8, 8)))),)),
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
    found["git_commit"] = (git.get("commit") or "unknown")[:7] + ("+changes" if git.get("dirty") else "")
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
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=float)
    return path


# ---------------------------------------------------------------- claim 1: AGC vs batch size

def run_agc(settings: AgcSettings, out: str, progress: Progress) -> dict[str, Any]:
    from nfnets_jax.analysis import agc_study, digits_training  # pylint: disable=import-outside-toplevel

    data = digits_training.load_digits(settings.image_size)
    num_train = len(data.train_labels)
    depth = 3 * sum(settings.depths) + 2
    lambdas = (digits_training.NO_CLIPPING,) + tuple(settings.clippings)
    nf = digits_training.make_forward("nf_resnet50", dict(width=settings.width, depths=settings.depths,
                                                          stochdepth_rate=0.0))
    bn = digits_training.make_forward("bn_resnet50", dict(width=settings.width, depths=settings.depths))
    trainers = {
        "nf": digits_training.DigitsTrainer(nf, data, microbatch=settings.microbatch,
                                            chunk_size=len(lambdas) * len(settings.seeds),
                                            fast_compile=settings.fast_compile),
        "bn": digits_training.DigitsTrainer(bn, data, microbatch=settings.microbatch,
                                            chunk_size=len(settings.seeds), fast_compile=settings.fast_compile),
    }
    compile_units = 40.0
    records = []
    for batch in settings.batches:
        steps = digits_training.steps_for_epochs(settings.epochs, batch, num_train)
        lr = settings.base_lr * batch / settings.base_batch
        warmup = int(round(settings.warmup_fraction * steps)) if steps > 1 else 0
        for model, chosen in (("nf", lambdas), ("bn", (digits_training.NO_CLIPPING,))):
            specs = [digits_training.RunSpec(seed, clipping, batch, steps, lr, warmup)
                     for seed in settings.seeds for clipping in chosen]
            first = trainers[model]._compiled is None  # pylint: disable=protected-access
            results = trainers[model].train(specs)
            for spec, result in zip(specs, results):
                clipping = None if model == "bn" else (0.0 if math.isinf(spec.clipping) else spec.clipping)
                point = agc_study.StudyPoint(model, depth, batch, clipping)
                records.append({"name": agc_study.run_name(point, spec.seed), "series": point.series,
                                "model": model, "clipping": clipping, "batch": batch, "seed": spec.seed,
                                "lr": lr, "steps": steps, **result})
            progress.advance((compile_units if first else 0.0) + len(specs) * settings.epochs,
                             f"agc: {model} batch {batch}")
            _write_json(os.path.join(out, "agc.runs.json"), {"runs": records})  # kept if a later stage fails
    record = summarize_agc(settings, records, out, depth=depth, num_train=num_train)
    os.remove(os.path.join(out, "agc.runs.json"))  # all of it is in agc.json
    return record


def summarize_agc(settings: AgcSettings, records: list[dict[str, Any]], out: str, *, depth: int,
                  num_train: int) -> dict[str, Any]:
    """The paper's aggregation, the tables and the figure from per-run records (those of a
    finished run of `run_agc`, or the `agc.runs.json` an interrupted one left)."""
    from nfnets_jax.analysis import agc_study  # pylint: disable=import-outside-toplevel

    runs = []
    for r in records:
        point, _ = agc_study.parse_run_name(r["name"])
        runs.append(agc_study.RunResult(r["name"], point, r["seed"], "finished", last_step=r["steps"],
                                        total_steps=r["steps"], metrics={"top_1_acc": r["test_acc"]}))
    rows = agc_study.aggregate(runs)
    diverged: dict[str, dict[int, float]] = {}
    for record in records:
        diverged.setdefault(record["series"], {}).setdefault(record["batch"], []).append(record["diverged"])
    diverged_fraction = {series: {batch: float(np.mean(flags)) for batch, flags in by_batch.items()}
                         for series, by_batch in diverged.items()}
    png = agc_study.plot_figure(
        rows, os.path.join(out, "agc.png"), y_span=60.0, dataset="digits test",
        title=(f"AGC λ vs batch size on digits ({settings.image_size}px, {settings.epochs:g} epochs, "
               f"LR {settings.base_lr:g}×batch/{settings.base_batch};\nResNet-{depth} width {settings.width:g})\n"
               "each point: mean of the best n−1 of n seeds; ▼: below the axis"))
    return {"settings": dataclasses.asdict(settings), "depth": depth, "num_train": num_train,
            "batches_done": sorted({r["batch"] for r in records}),
            "rows": rows, "runs": records, "diverged_fraction": diverged_fraction,
            "table": agc_study.markdown_table(rows), "figures": [png]}


# ---------------------------------------------------------------- claim 2: NF vs BN

def _nfnet_kwargs(settings: NfVsBnSettings, norm: str) -> dict[str, Any]:
    return dict(depths=settings.depths, widths=settings.widths, stem_channels=settings.stem_channels,
                group_size=settings.group_size, stochdepth_rate=0.0, drop_rate=0.0, norm=norm)


def run_nf_vs_bn(settings: NfVsBnSettings, out: str, progress: Progress) -> dict[str, Any]:
    from nfnets_jax.analysis import digits_training, step_cost  # pylint: disable=import-outside-toplevel

    data = digits_training.load_digits(settings.image_size)
    num_train = len(data.train_labels)
    steps = digits_training.steps_for_epochs(settings.epochs, settings.batch, num_train)
    images, labels = data.train_images[:settings.batch], data.train_labels[:settings.batch]
    compiled = []
    for norm in ("none", "batchnorm"):
        forward = digits_training.make_forward("nfnet_f0", _nfnet_kwargs(settings, norm))
        variant = step_cost.StepVariant("NF" if norm == "none" else "BN")
        compiled.append(step_cost.compile_step(forward, variant, images=images, labels=labels, num_classes=10))
        progress.advance(40, f"nf_vs_bn: compiled the {variant.name} step")
    timings = step_cost.time_interleaved(compiled, repeats=settings.repeats,
                                         steps_per_repeat=settings.steps_per_repeat,
                                         on_repeat=lambda i: progress.advance(2, f"nf_vs_bn: timing {i + 1}"))
    accuracy: dict[str, Any] = {}
    for norm, name, clipping in (("none", "NF", settings.clipping), ("batchnorm", "BN", digits_training.NO_CLIPPING)):
        forward = digits_training.make_forward("nfnet_f0", _nfnet_kwargs(settings, norm))
        trainer = digits_training.DigitsTrainer(forward, data, microbatch=settings.batch,
                                                chunk_size=len(settings.seeds), fast_compile=settings.fast_compile)
        warmup = int(round(steps * 5 / 90)) if steps > 1 else 0
        specs = [digits_training.RunSpec(seed, clipping, settings.batch, steps, settings.lr, warmup)
                 for seed in settings.seeds]
        results = trainer.train(specs)
        accs = [r["test_acc"] for r in results]
        accuracy[name] = {"per_seed": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
                          "diverged": [r["diverged"] for r in results],
                          "agc_clipping": None if math.isinf(clipping) else clipping}
        progress.advance(40 + 20 + len(specs) * settings.epochs, f"nf_vs_bn: trained {name}")
    rows = {step.name: {"step_time": timings[step.name], "memory": step.memory.as_record(),
                        "compile_seconds": step.compile_seconds, "accuracy": accuracy[step.name]}
            for step in compiled}
    png = _bar_figure(
        os.path.join(out, "nf_vs_bn.png"),
        {"train step (ms, median)": {n: 1e3 * r["step_time"]["median_s"] for n, r in rows.items()},
         "compiled step peak memory (MiB)": {n: r["memory"]["peak_estimate"] / 2**20 for n, r in rows.items()},
         "digits test top-1 (%)": {n: 100 * r["accuracy"]["mean"] for n, r in rows.items()}},
        f"NFNet architecture, NF vs BatchNorm (digits {settings.image_size}px, batch {settings.batch})")
    return {"settings": dataclasses.asdict(settings), "steps": steps, "results": rows,
            "time_ratio_bn_over_nf": rows["BN"]["step_time"]["median_s"] / rows["NF"]["step_time"]["median_s"],
            "memory_ratio_bn_over_nf": rows["BN"]["memory"]["peak_estimate"] / rows["NF"]["memory"]["peak_estimate"],
            "figures": [png]}


# ---------------------------------------------------------------- claim 3: the cost of AGC and SAM

def cost_variants() -> list:
    from nfnets_jax.analysis import step_cost  # pylint: disable=import-outside-toplevel

    return [step_cost.StepVariant("plain"), step_cost.StepVariant("AGC", clipping=0.01),
            step_cost.StepVariant("AGC + modified SAM (20%, unsynced)", clipping=0.01, sam_ascent_fraction=0.2),
            step_cost.StepVariant("AGC + full SAM", clipping=0.01, sam_ascent_fraction=1.0)]


def _time_variants(label: str, forward, images, labels, repeats: int, steps_per_repeat: int,
                   progress: Progress) -> dict[str, Any]:
    from nfnets_jax.analysis import step_cost  # pylint: disable=import-outside-toplevel

    compiled = []
    for variant in cost_variants():
        compiled.append(step_cost.compile_step(forward, variant, images=images, labels=labels, num_classes=10))
        progress.advance(10, f"cost: compiled {label} {variant.name}")
    timings = step_cost.time_interleaved(compiled, repeats=repeats, steps_per_repeat=steps_per_repeat,
                                         on_repeat=lambda i: progress.advance(5, f"cost: {label} round {i + 1}"))
    ratios = step_cost.ratios(timings, "plain")
    over_agc = step_cost.ratios(timings, "AGC")
    return {"timings": timings, "ratio_to_plain": ratios, "ratio_to_agc": over_agc,
            "compile_seconds": {step.name: step.compile_seconds for step in compiled},
            "memory": {step.name: step.memory.as_record() for step in compiled},
            "batch": int(images.shape[0]), "image_size": int(images.shape[1])}


def run_cost(settings: CostSettings, out: str, progress: Progress) -> dict[str, Any]:
    from nfnets_jax.analysis import digits_training  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    f0_images = rng.standard_normal((settings.f0_batch, settings.f0_image_size, settings.f0_image_size, 3),
                                    dtype=np.float32)
    f0_labels = rng.integers(0, 10, settings.f0_batch)
    f0 = digits_training.make_forward("nfnet_f0", dict(settings.f0_kwargs))
    results = {"F0": _time_variants("F0", f0, f0_images, f0_labels, settings.f0_repeats,
                                    settings.f0_steps_per_repeat, progress)}
    digits = settings.digits
    if digits is not None:
        data = digits_training.load_digits(digits.image_size)
        model = digits_training.make_forward("nfnet_f0", _nfnet_kwargs(digits, "none"))
        results["digits NFNet"] = _time_variants("digits", model, data.train_images[:digits.batch],
                                                 data.train_labels[:digits.batch], settings.digits_repeats,
                                                 settings.digits_steps_per_repeat, progress)
    png = _bar_figure(os.path.join(out, "cost.png"),
                      {f"{name}: step time / plain step": result["ratio_to_plain"] for name, result in results.items()},
                      "Cost of AGC and SAM per train step (median of interleaved repeats)", reference=1.0)
    return {"settings": _jsonable(dataclasses.asdict(settings)), "results": results, "figures": [png],
            "targets": {"AGC over plain": 1.03, "modified SAM over AGC": 1.4}}


# ---------------------------------------------------------------- claim 4: signal propagation

def run_spp(settings: SppSettings, out: str, progress: Progress) -> dict[str, Any]:
    from . import signal_propagation as spp_command  # pylint: disable=import-outside-toplevel
    from nfnets_jax.analysis import signal_propagation  # pylint: disable=import-outside-toplevel

    probes = {"gaussian": signal_propagation.gaussian_images(settings.batch, settings.resolution),
              "smooth": signal_propagation.smooth_images(settings.batch, settings.resolution,
                                                         correlation_px=settings.correlation_px)}
    by_model = {}
    for name in settings.models:  # one compile per model, run on both probes
        kwargs = dict(dict(settings.model_kwargs).get(name, ()))
        by_model[name] = signal_propagation.measure_probes(name, probes, **kwargs)
        progress.advance(len(probes), f"spp: {name}, {' and '.join(probes)} inputs")
    results, figures = {}, []
    for probe in probes:
        measured = [by_model[name][probe] for name in settings.models]
        results[probe] = {r.model: spp_command._summary(r) | {"curves": r.to_json()} for r in measured}  # pylint: disable=protected-access
        what = "N(0,1) white noise" if probe == "gaussian" else f"image-like (noise smoothed over {settings.correlation_px:g}px)"
        figures.append(spp_command.plot(measured, os.path.join(out, f"spp_{probe}.png"),
                                        f"Signal propagation at init, {what}, batch {settings.batch}, "
                                        f"{settings.resolution}px, skip gains 1"))
    return {"settings": _jsonable(dataclasses.asdict(settings)), "results": results, "figures": figures}


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


RUNNERS: dict[str, Callable[[Any, str, Progress], dict[str, Any]]] = {
    "agc": run_agc, "nf_vs_bn": run_nf_vs_bn, "cost": run_cost, "spp": run_spp}

# The work each claim announces to the progress bar before anything runs: units of roughly
# equal wall time on a CPU (a compile ≈ 10–40, a run-epoch ≈ 1, a timing round ≈ 2–5).
WORK_UNITS: dict[str, Callable[[Any], float]] = {
    "agc": lambda s: 2 * 40.0 + len(s.batches) * (len(s.clippings) + 2) * len(s.seeds) * s.epochs,
    "nf_vs_bn": lambda s: 2 * 40.0 + s.repeats * 2 + 2 * (40 + 20 + len(s.seeds) * s.epochs),
    "cost": lambda s: 4 * 10.0 + 5 * s.f0_repeats + (0 if s.digits is None else 4 * 10.0 + 5 * s.digits_repeats),
    "spp": lambda s: 2.0 * len(s.models),
}


FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_list("only", list(CLAIMS), f"Claims to run, of {','.join(CLAIMS)} (default: all).", flag_values=FLAGS)
flags.DEFINE_bool("quick", False, "Tiny sizes: checks the machinery in a few minutes.", flag_values=FLAGS)
flags.DEFINE_string("out", None, f"Directory for the JSON and PNG files (default: {DEFAULT_OUT}).", flag_values=FLAGS)
flags.DEFINE_string("doc", None, f"The Markdown page to (re)write from every claim JSON in --out (default: "
                    f"{DEFAULT_DOC} with the default --out, else <out>/reproduction.md).", flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False, positional=False)
    args = FLAGS
    claims = [claim for claim in args.only if claim]
    unknown = sorted(set(claims) - set(CLAIMS))
    if unknown or not claims:
        command_line.fail(f"--only takes a comma-separated subset of {','.join(CLAIMS)}; got {','.join(args.only)!r}.")
    out = args.out or DEFAULT_OUT
    doc = args.doc or (DEFAULT_DOC if args.out is None else os.path.join(out, "reproduction.md"))
    os.makedirs(out, exist_ok=True)

    from . import reproduction_page  # pylint: disable=import-outside-toplevel

    settings = QUICK if args.quick else FULL
    command = "python -m experiments.reproduce" + (" --quick" if args.quick else "") + \
        ("" if claims == list(CLAIMS) else f" --only {','.join(claims)}")
    progress = Progress()
    for claim in claims:
        progress.add(WORK_UNITS[claim](settings[claim]))
    written = {}
    for claim in claims:
        start = time.perf_counter()
        provenance = versions()
        record = RUNNERS[claim](settings[claim], out, progress)
        record.update({"claim": claim, "quick": args.quick, "command": command,
                       "seconds": round(time.perf_counter() - start, 1), "versions": provenance})
        written[claim] = _write_json(os.path.join(out, f"{claim}.json"), _jsonable(record))
    page = reproduction_page.write(out, doc)
    summary = {"json": written, "doc": page, "seconds": round(time.perf_counter() - progress.start, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
