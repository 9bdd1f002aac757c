"""The AGC λ × batch-size study (Brock et al. 2021 §4.1, Figures 2 and 7; docs/recipe.md):
run naming, reading each run's final evaluation, the paper's seed aggregation, the tables and
the figure.

Each run trains in its own workdir named for its grid point (`run_name`):
`d{depth}_b{batch}_c{clipping}_s{seed}` for NF-ResNets (`c0`: no AGC) and `bn_d{depth}_b{batch}_s{seed}`
for the BN-ResNet baseline. A run's result is the last evaluation it wrote to `metrics.jsonl`
(docs/CONTRACTS.md, train section), counted only once the run finished (`read_run`).

Aggregation (`aggregate_seeds`): the paper reports, per point, the mean of the best 4 of 5 seeds.
We apply the rule it implies for any seed count n — drop the single worst seed when n >= 3, keep
all seeds when n <= 2 — so 5 seeds give the paper's best-4 mean, 4 give the best 3, 3 the best 2.
Unfinished and missing runs are left out before the rule is applied and reported separately.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from nfnets_jax.train.metrics_logging import METRICS_FILE

CONFIG_FILE = "config.json"  # experiments/train.py writes the run's config here
METRICS = ("top_1_acc", "ema_top_1_acc")  # final eval top-1: raw and EMA parameters
AGGREGATION_RULE = ("per point, the mean final top-1 of the finished seeds without the worst one "
                    "when 3 or more finished (5 seeds: the paper's mean of the best 4), of all of "
                    "them when 1 or 2 finished; unfinished and missing runs are left out")

_NF_RUN = re.compile(r"^d(?P<depth>\d+)_b(?P<batch>\d+)_c(?P<clipping>[0-9.eE+-]+)_s(?P<seed>\d+)$")
_BN_RUN = re.compile(r"^bn_d(?P<depth>\d+)_b(?P<batch>\d+)_s(?P<seed>\d+)$")


@dataclasses.dataclass(frozen=True)
class StudyPoint:
    """One point of the figure: an NF-ResNet at λ = `clipping` (0: no AGC), or a BN-ResNet
    (`model='bn'`, `clipping` None)."""

    model: str  # 'nf' | 'bn'
    depth: int
    batch: int
    clipping: float | None

    @property
    def series(self) -> str:
        """The figure line this point belongs to: 'λ=0.01', …, 'no AGC', 'BN'."""
        if self.model == "bn":
            return "BN"
        return "no AGC" if not self.clipping else f"λ={format_clipping(self.clipping)}"


def format_clipping(clipping: float) -> str:
    """0.04 -> '0.04', 0.0 -> '0': the form used in run names and config arguments."""
    return f"{float(clipping):g}"


def run_name(point: StudyPoint, seed: int) -> str:
    """The workdir name of one run of `point` (parsed back by `parse_run_name`)."""
    if point.model == "bn":
        return f"bn_d{point.depth}_b{point.batch}_s{seed}"
    return f"d{point.depth}_b{point.batch}_c{format_clipping(point.clipping or 0.0)}_s{seed}"


def parse_run_name(name: str) -> tuple[StudyPoint, int] | None:
    """`run_name`'s inverse: (point, seed), or None for a folder that is not a study run."""
    if match := _NF_RUN.match(name):
        try:
            clipping = float(match["clipping"])
        except ValueError:
            return None
        return StudyPoint("nf", int(match["depth"]), int(match["batch"]), clipping), int(match["seed"])
    if match := _BN_RUN.match(name):
        return StudyPoint("bn", int(match["depth"]), int(match["batch"]), None), int(match["seed"])
    return None


@dataclasses.dataclass
class RunResult:
    """What one run's workdir says. `status`: 'finished' (final eval written), 'unfinished'
    (metrics but no final eval: still running, crashed, preempted, or stopped on a non-finite
    loss), 'missing' (no metrics.jsonl). `metrics` holds the final eval's top-1 values."""

    name: str
    point: StudyPoint
    seed: int
    status: str
    last_step: int | None = None
    total_steps: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    note: str = ""


def _read_records(path: str) -> list[dict[str, Any]]:
    """Every complete JSON line; a torn last line (a run killed mid-write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _eval_every_steps(workdir: str) -> int | None:
    try:
        with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
            return int(json.load(f)["eval"]["every_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_run(workdir: str, point: StudyPoint, seed: int, total_steps: int | None = None) -> RunResult:
    """The final evaluation of one run, if it finished.

    The training loop writes its last eval at `total_steps`, after the last train record
    (nfnets_jax/train/loop.py). With `total_steps` known (from plan.json), a run is finished when
    it has an eval record at that step. Without it, a run is finished when its last eval is at or
    after its last train step and is not at a multiple of `eval.every_steps` (config.json), where
    the loop also evaluates mid-run; an eval at such a multiple is taken as final but noted.
    """
    name = os.path.basename(os.path.normpath(workdir))
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return RunResult(name, point, seed, "missing", total_steps=total_steps, note="no metrics.jsonl")
    records = _read_records(path)
    train_steps = [r["step"] for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    last_step = max([r["step"] for r in records if "step" in r], default=None)
    result = RunResult(name, point, seed, "unfinished", last_step=last_step, total_steps=total_steps)
    if not records:
        result.status, result.note = "missing", "empty metrics.jsonl"
        return result
    if total_steps is not None:
        final = [r for r in evals if r["step"] == total_steps]
        if not final:
            result.note = f"no eval at the last step {total_steps}"
            return result
    else:
        final = [r for r in evals if r["step"] >= max(train_steps, default=0)]
        if not final:
            result.note = "no eval after the last train step"
            return result
        every = _eval_every_steps(workdir)
        if every and final[-1]["step"] % every == 0:
            result.note = (f"eval at step {final[-1]['step']} (a multiple of eval.every_steps={every}) "
                           "taken as final; total steps unknown")
    result.status = "finished"
    result.metrics = {k: float(final[-1][k]) for k in METRICS if k in final[-1]}
    return result


def aggregate_seeds(values: Sequence[float]) -> tuple[float, list[float]]:
    """(mean, the values it averages): the paper's "mean of the best 4 of 5 seeds" (§4.1),
    generalised as: drop the single worst value when there are 3 or more, else keep all.
    Non-finite values count as the worst. Empty input gives NaN."""
    ordered = sorted((float(v) for v in values), key=lambda v: v if math.isfinite(v) else -math.inf,
                     reverse=True)
    kept = ordered[:-1] if len(ordered) >= 3 else ordered
    return (float(np.mean(kept)) if kept else float("nan")), kept


def aggregate(runs: Iterable[RunResult]) -> list[dict[str, Any]]:
    """One row per study point: per-seed final top-1 (raw and EMA when logged) of the finished
    runs, their `aggregate_seeds` mean and the standard deviation of the kept seeds, and the
    seeds that did not finish."""
    by_point: dict[StudyPoint, list[RunResult]] = {}
    for run in runs:
        by_point.setdefault(run.point, []).append(run)
    rows = []
    for point in sorted(by_point, key=_point_order):
        point_runs = sorted(by_point[point], key=lambda r: r.seed)
        finished = [r for r in point_runs if r.status == "finished"]
        row: dict[str, Any] = {
            "model": point.model, "depth": point.depth, "batch": point.batch,
            "clipping": point.clipping, "series": point.series,
            "seeds_planned": len(point_runs), "seeds_finished": len(finished),
            "seeds_not_finished": {r.seed: r.status for r in point_runs if r.status != "finished"},
        }
        for metric in METRICS:
            per_seed = {r.seed: r.metrics[metric] for r in finished if metric in r.metrics}
            if not per_seed:
                continue
            mean, kept = aggregate_seeds(list(per_seed.values()))
            row[metric] = {"mean": mean, "std": float(np.std(kept)), "n_kept": len(kept),
                           "per_seed": per_seed}
        rows.append(row)
    return rows


def _point_order(point: StudyPoint) -> tuple:
    return (point.depth, point.model == "bn", not point.clipping, point.clipping or 0.0, point.batch)


def _series_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """λ lines in increasing λ, then 'no AGC', then 'BN'."""
    clippings = sorted({r["clipping"] for r in rows if r["model"] == "nf" and r["clipping"]})
    series = [f"λ={format_clipping(c)}" for c in clippings]
    series += [s for s in ("no AGC", "BN") if any(r["series"] == s for r in rows)]
    return series


def markdown_table(rows: Sequence[Mapping[str, Any]], metric: str = "top_1_acc") -> str:
    """Per depth: one row per batch size, one column per line of the figure. A cell is the
    aggregated top-1 in % with `(k/n)`, the seeds averaged out of those planned, when k < n−1 or
    a run is missing; '—' where nothing finished. The best cell of each batch row is bold."""
    lines = [f"Final eval {metric} (%), mean of the best n−1 of n seeds (paper: best 4 of 5; "
             "n ≤ 2: all).", ""]
    for depth in sorted({r["depth"] for r in rows}):
        depth_rows = [r for r in rows if r["depth"] == depth]
        series = _series_order(depth_rows)
        lines += [f"**ResNet-{depth}**", "", "| batch | " + " | ".join(series) + " |",
                  "|---|" + "---|" * len(series)]
        for batch in sorted({r["batch"] for r in depth_rows}):
            cells = {r["series"]: r for r in depth_rows if r["batch"] == batch}
            means = {s: cells[s][metric]["mean"] for s in series if s in cells and metric in cells[s]}
            best = max(means.values(), default=None)
            texts = []
            for s in series:
                if s not in means:
                    texts.append("—")
                    continue
                text = f"{100 * means[s]:.2f}"
                if means[s] == best:
                    text = f"**{text}**"
                row = cells[s]
                if row["seeds_finished"] < row["seeds_planned"]:
                    text += f" ({row['seeds_finished']}/{row['seeds_planned']})"
                texts.append(text)
            lines.append(f"| {batch} | " + " | ".join(texts) + " |")
        lines.append("")
    lines.append("(k/n): k of n planned seeds finished; the rest are listed in the JSON table.")
    return "\n".join(lines) + "\n"


def plot_figure(rows: Sequence[Mapping[str, Any]], png_path: str, metric: str = "top_1_acc",
                y_span: float = 10.0, title: str | None = None, dataset: str = "ImageNet") -> str:
    """The paper's Figure 2 / 7 layout: top-1 (%) against batch size on a log2 axis, one line per
    λ (light to dark as λ grows), the no-AGC NF-ResNet (dashed) and the BN-ResNet (dotted), one
    panel per depth, one legend. Error bars: the standard deviation of the seeds averaged.

    The y axis reaches at most `y_span` points below the best mean, so one diverged point does
    not flatten the rest; a mean below that is drawn as ▼ on the lower edge, labelled with its
    value. `dataset` names the data on the y axis. Returns `png_path`.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import matplotlib.ticker  # pylint: disable=import-outside-toplevel

    depths = sorted({r["depth"] for r in rows})
    width = 5.5 * max(1, len(depths)) + 1.8  # + the legend's column
    fig, axes = plt.subplots(1, max(1, len(depths)), figsize=(width, 4.8), squeeze=False)
    for axis, depth in zip(axes[0], depths):
        depth_rows = [r for r in rows if r["depth"] == depth and metric in r]
        series = _series_order([r for r in rows if r["depth"] == depth])
        lambdas = [s for s in series if s.startswith("λ")]
        colors = plt.cm.viridis(np.linspace(0.9, 0.1, max(1, len(lambdas))))
        style = {s: dict(color=c, linestyle="-", marker="o") for s, c in zip(lambdas, colors)}
        style["no AGC"] = dict(color="black", linestyle="--", marker="s")
        style["BN"] = dict(color="tab:red", linestyle=":", marker="^")
        spread = [(100 * r[metric]["mean"], 100 * r[metric]["std"]) for r in depth_rows
                  if math.isfinite(r[metric]["mean"])]
        best = max((mean for mean, _ in spread), default=100.0)
        bottom = max(min((mean - std for mean, std in spread), default=0.0), best - y_span)
        top = max((mean + std for mean, std in spread if mean >= bottom), default=best)
        pad = 0.05 * max(top - bottom, 0.5)
        for index, name in enumerate(series):
            dodge = 2.0 ** (0.02 * (index - (len(series) - 1) / 2))  # keeps error bars apart
            points = sorted((r["batch"], 100 * r[metric]["mean"], 100 * r[metric]["std"])
                            for r in depth_rows if r["series"] == name)
            if not points:
                continue
            batches, means, stds = (np.array(column, dtype=float) for column in zip(*points))
            batches = batches * dodge
            below = means < bottom  # drawn as ▼ on the lower edge, the line running down to it
            shown = np.where(below, bottom - pad, means)
            axis.errorbar(batches, shown, yerr=np.where(below, 0.0, stds), capsize=2, markersize=4,
                          linewidth=1.4, label=name, markevery=list(np.flatnonzero(~below)),
                          **style[name])
            for batch, mean in zip(batches[below], means[below]):
                axis.plot(batch, bottom - pad, marker="v", color=style[name]["color"], markersize=9,
                          clip_on=False, zorder=5)
                axis.annotate(f"{mean:.1f}%", (batch, bottom - pad), textcoords="offset points",
                              xytext=(-8, 4), ha="right", fontsize=8, color=style[name]["color"])
        axis.set_xscale("log", base=2)
        batches_all = sorted({r["batch"] for r in depth_rows})
        axis.set_xticks(batches_all)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{int(v)}"))
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_ylim(bottom - pad, top + pad)
        axis.set_xlabel("batch size")
        axis.set_ylabel(f"{dataset} top-1 (%), {'EMA' if metric.startswith('ema') else 'raw'} params")
        axis.set_title(f"ResNet-{depth}")
        axis.grid(alpha=0.3)
    labelled = {}  # one legend for all panels, outside them, in series order
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    order = _series_order(rows)
    labels = [label for label in order if label in labelled]
    fig.suptitle(title or "AGC clipping threshold λ vs batch size\n"
                          "(NF-ResNets, 90 epochs; each point: mean of the best n−1 of n seeds)")
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / width, 1))
    if labels:
        fig.legend([labelled[label] for label in labels], labels, loc="center right", fontsize="small",
                   title="NF-ResNet λ\n(BN: BN-ResNet)", title_fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
