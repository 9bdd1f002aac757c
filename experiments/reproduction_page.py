"""Writes docs/reproduction.md from the claim JSONs of `experiments.reproduce`.

The page is generated, not edited by hand: every number on it is a value of `<claim>.json`
formatted (scaled to %, ms, MiB or minutes at most), and every verdict is a sentence chosen by
the answer `experiments.reproduce` computed from the measurements (`*_verdicts`), so the text and
the measurements cannot drift apart (tests/test_reproduce.py checks every number on the page
against the JSON). The hand-written parts here are prose without figures. Claims without a JSON
are listed as not run; a claim whose JSON is marked incomplete says which part is pending.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

TITLE = "# The paper's claims, reproduced in miniature on Fashion-MNIST"

INTRO = """The full-scale studies need ImageNet and a TPU pod (`python -m experiments.agc_study plan` prints
them). This page holds what runs on a two-core CPU: small models on Fashion-MNIST (Zalando's train / test
split, read from Debian's `dataset-fashion-mnist` files, see docs/fashion_mnist.md), downsampled as each
section says, and synthetic inputs for signal propagation. It is written by `python -m experiments.reproduce`
from the JSON files next to the figures (`docs/reproduction/`); rerun it to regenerate both. Every number
below is read from those files and every verdict (yes / partly / no) is computed from them by the rules
stated with it. A difference "exceeds the seed spread" when the two means differ by more than the sum of
their standard deviations over seeds. Each claim records the load average of the shared machine at its
start and end: ratios measured interleaved in one process are meaningful under load; absolute times are not.
"""


def _read(out: str, claim: str) -> dict[str, Any] | None:
    path = os.path.join(out, f"{claim}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _figure(record: dict[str, Any], doc_dir: str, index: int = 0, alt: str = "figure") -> str:
    path = os.path.relpath(record["figures"][index], doc_dir)
    return f"![{alt}]({path.replace(os.sep, '/')})"


def _pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}"


def _acc(summary: Mapping[str, Any]) -> str:
    """'mean ± sd' in % of a `reproduce.seed_summary`."""
    return f"{_pct(summary['mean'])} ± {_pct(summary['sd'])}"


def _sig(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits in fixed notation (7.07e-05 -> '0.0000707')."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _lam(clipping: float) -> str:
    return f"{clipping:g}"


def _spread(entry: Mapping[str, Any]) -> str:
    """'Δ X points, spread Y: exceeds it / within it' of a `reproduce.differs` record (in %)."""
    verdict = "exceeds the seed spread" if entry["exceeds_spread"] else "within the seed spread"
    return f"Δ {_pct(entry['difference'])} points, spread {_pct(entry['spread'])}: {verdict}"


def _footer(record: dict[str, Any]) -> str:
    if "versions" not in record:  # a partial record written by the study itself while it ran
        return "*A partial record, written while the study ran: its command, runtime and versions are added when it completes.*\n"
    v = record["versions"]
    packages = ", ".join(f"{k} {v[k]}" for k in ("python", "jax", "jaxlib", "dm-haiku", "optax", "orbax-checkpoint",
                                                 "tensorflow", "tensorflow-datasets") if k in v)
    quick = " **(--quick: tiny sizes, not the committed setting)**" if record.get("quick") else ""
    return (f"*Command:* `{record['command']}`{quick} · *runtime of this claim:* {record['seconds'] / 60:.1f} min · "
            f"*machine:* {v.get('machine', '?')}, load average at start {v.get('load_average_at_start', '?')}, "
            f"at end {record.get('load_average_at_end', '?')} · "
            f"*versions:* {packages} · *commit:* {v.get('git_commit', '?')}\n")


def _answer(word: str) -> str:
    return f"**{word}**"


# ---------------------------------------------------------------- 1. AGC vs batch size

def _series_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lambdas = sorted({r["clipping"] for r in rows if r["model"] == "nf" and r["clipping"]})
    series = [f"λ={_lam(c)}" for c in lambdas]
    return series + [s for s in ("no AGC", "BN") if any(r["series"] == s for r in rows)]


def _grid_table(rows: Sequence[Mapping[str, Any]], cell, header: str, bold_best: bool = False) -> list[str]:
    series = _series_order(rows)
    batches = sorted({r["batch"] for r in rows})
    lines = [f"| {header} | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
    for batch in batches:
        cells = {r["series"]: r for r in rows if r["batch"] == batch}
        best = max((r["accuracy"]["mean"] for r in cells.values()), default=None)
        texts = []
        for s in series:
            if s not in cells:
                texts.append("—")
                continue
            text = cell(cells[s])
            if bold_best and cells[s]["accuracy"]["mean"] == best:
                text = f"**{text}**"
            texts.append(text)
        lines.append(f"| {batch} | " + " | ".join(texts) + " |")
    return lines


def _agc_verdicts(record: dict[str, Any]) -> list[str]:
    v = record["verdicts"]
    lines = ["**Verdicts** (computed from the table above by `experiments.reproduce.agc_verdicts`):", ""]
    if "bn_across_batches" in v:
        b = v["bn_across_batches"]
        lines.append(
            f"- *Design check: are {b['steps_large']} steps enough to train at batch {b['large_batch']}?* — the "
            f"BN-ResNet, which needs no clipping, reaches {_pct(b['mean_small'])} % at batch {b['small_batch']} "
            f"({b['steps_small']} steps) and {_pct(b['mean_large'])} % at batch {b['large_batch']} ({_spread(b)}). "
            + ("So the step count at the largest batch is enough to train, and the comparisons there are about the "
               "batch, not about too few steps." if b["enough_steps"] else
               "So the largest batch also means too few steps here: what differs at that batch is confounded with "
               "training length, for every model alike, and the comparisons below are made within each batch."))
    if "unclipped_degrades" in v:
        d = v["unclipped_degrades"]
        measured = (f"{_pct(d['mean_small'])} % at batch {d['small_batch']} against {_pct(d['mean_large'])} % at "
                    f"batch {d['large_batch']}")
        if d["answer"] == "not tested":
            lines.append(f"- *Without AGC, the NF-ResNet degrades at large batch* — {_answer(d['answer'])} at these "
                         f"batches: it does not train already at the smaller one ({measured}; fraction of seeds "
                         f"diverged {d['diverged_small']:.2f} → {d['diverged_large']:.2f}).")
        else:
            lines.append(
                f"- *Without AGC, the NF-ResNet degrades at large batch* — {_answer(d['answer'])}: {measured} "
                f"({_spread(d)}); fraction of seeds diverged {d['diverged_small']:.2f} → {d['diverged_large']:.2f}.")
    if "no_agc_vs_best_clipping_at_smallest_batch" in v:
        c = v["no_agc_vs_best_clipping_at_smallest_batch"]
        lines.append(f"- *At the smallest batch, where nothing diverges* — no AGC {_pct(c['no_agc_mean'])} % vs the best "
                     f"λ={_lam(c['clipping'])} {_pct(c['agc_mean'])} % ({_spread(c)}).")
    if "agc_matches_bn" in v:
        m = v["agc_matches_bn"]
        parts = [f"batch {b}: BN {_pct(g['bn_mean'])} % vs λ={_lam(g['clipping'])} {_pct(g['nf_mean'])} % "
                 f"({_spread(g)})" for b, g in m["by_batch"].items()]
        lines.append(f"- *With AGC, the NF-ResNet matches BN up to the largest batch* — {_answer(m['answer'])}: "
                     + "; ".join(parts) + ". (BN − NF at the best λ of each batch; 'matches' means NF is not "
                     "below BN by more than the spread.)")
    if "smaller_lambda_at_larger_batch" in v:
        s = v["smaller_lambda_at_larger_batch"]
        best = ", ".join(f"{_lam(c)} at {b}" for b, c in s["best_by_batch"].items())
        text = (f"- *The best λ is smaller at larger batch* — {_answer(s['answer'])}: best λ {best}"
                f" (never growing with the batch: {'yes' if s['monotone'] else 'no'}).")
        if "penalty" in s:
            text += (f" At the largest batch, the best λ ({_lam(s['large_batch_clipping'])}) against the small "
                     f"batch's best ({_lam(s['small_batch_clipping'])}): {_spread(s['penalty'])}.")
        elif "small_batch_clipping" in s and s["large_batch_clipping"] < s["small_batch_clipping"]:
            text += (f" The small batch's best λ ({_lam(s['small_batch_clipping'])}) was not run at the largest "
                     "batch, so what it would cost there is not measured.")
        lines.append(text)
    bracketed = v.get("bracketed", {})
    if bracketed:
        open_ends = [b for b, ok in bracketed.items() if not ok]
        lines.append("- *The λ grid brackets the best λ at every batch* — "
                     + (_answer("yes") + "." if not open_ends else
                        _answer("no") + f": not at batch {', '.join(open_ends)} (the extension limit was reached)."))
    if "clipping_at_largest_batch" in v:
        c = v["clipping_at_largest_batch"]
        stages = ", ".join(f"{stage} {_pct(value, 1)} %" for stage, value in c["mean"].items())
        early = ", ".join(f"{stage} {_pct(value, 1)} %" for stage, value in c["early"].items())
        lines.append(f"- *What AGC does at the largest batch* (λ={_lam(c['clipping'])}): fraction of conv-weight "
                     f"units clipped, averaged over all steps: {stages}; over the first tenth of the steps: {early}. "
                     f"Fraction of seeds diverged: {c['no_agc_diverged']:.2f} without AGC, "
                     f"{c['best_diverged']:.2f} at λ={_lam(c['clipping'])}"
                     + ("; λ values at which seeds diverged: "
                        + ", ".join(f"{series} ({fraction:.2f})" for series, fraction in c["agc_diverged"].items()
                                    if fraction > 0) if any(c["agc_diverged"].values()) else "")
                     + ("; λ values at which seeds did not train: "
                        + ", ".join(f"{series} ({fraction:.2f})" for series, fraction in c["agc_at_chance"].items()
                                    if fraction > 0) if any(c.get("agc_at_chance", {}).values()) else "")
                     + ".")
    return lines


def _agc(record: dict[str, Any], doc_dir: str) -> str:
    s, p, rows = record["settings"], record["paper"], record["rows"]
    batches = record["batches_done"]
    steps = {r["batch"]: r["steps"] for r in rows}
    lines = [
        f"## {TITLES['agc']}",
        "",
        f"Design. NF-ResNet and BN-ResNet with one bottleneck block per stage (ResNet-{record['depth']}, width "
        f"{s['width']:g}), Fashion-MNIST downsampled to {s['image_size']} px (the mean of 2×2 blocks), "
        f"{record['num_train']} training images, {s['epochs']:g} epochs at every batch size (the paper: "
        f"{p['epochs']} on ImageNet), LR {s['base_lr']:g} × batch/{s['base_batch']} (the paper's rule), linear "
        f"warmup over the first {p['warmup_epochs']}/{p['epochs']} of the steps then cosine to 0, SGD-Nesterov, "
        "no augmentation. AGC as in the paper: unit-wise, the classifier weight excluded; λ = ∞ is the no-AGC line "
        "(the same program, nothing clipped). The BN-ResNet trains without AGC, as the paper's baselines do. A "
        f"batch's gradient is averaged over microbatches of {s['microbatch']} (exact for NF; BN normalises per "
        "microbatch, like per-device BN in the paper's data-parallel baselines). λ grid: "
        f"{', '.join(_lam(c) for c in s['clippings'])} (the paper's: {', '.join(_lam(c) for c in p['clippings'])}), "
        "then at each batch halved below or doubled "
        f"above while the best λ sits at an end, at most {s['max_extensions']} times. Seeds "
        f"{', '.join(map(str, s['seeds']))}: every cell is the mean ± sample standard deviation over all of them "
        f"(the paper's mean of the best {p['seeds_averaged']} of {p['seeds']} is beside it, in its own table).",
        "",
        f"Shrunk from the paper's study (ResNet-{p['depths'][0]} and deeper on ImageNet, batch "
        f"{p['batches'][0]}–{p['batches'][-1]}, {p['epochs']} epochs, {p['seeds']} seeds) so that the full grid runs "
        f"in about an hour on two shared CPU cores: a {record['depth']}-layer network at width "
        f"{s['width']:g} on small grey images; batches: {', '.join(map(str, s['batches']))}; "
        f"epochs: {s['epochs']:g}; seeds: {len(s['seeds'])}.",
        "",
        "Steps per run: " + ", ".join(f"{steps[b]} at batch {b}" for b in batches)
        + ". Same epochs at every batch means the largest batch gets the fewest steps, as in the paper; the "
        "epoch count is what the time budget allowed on this machine (one run's cost was measured first, and the "
        "grid sized from it). Whether that many steps is enough to train at the largest batch is read from the "
        "BN-ResNet, which needs no clipping: compare its accuracy across batches below.",
        "",
    ]
    if not record.get("complete", True):
        pending = [b for b in s["batches"] if b not in batches]
        lines += [f"**Incomplete:** batch sizes {', '.join(map(str, pending))} are pending (not finished when this page was generated; "
                  "rerunning the command continues from the runs already stored).", ""]
    lines += [_figure(record, doc_dir, alt="AGC clipping threshold vs batch size on Fashion-MNIST"), "",
              "Test top-1 (%), mean ± sd over all seeds (bold: best of the batch):", ""]
    lines += _grid_table(rows, lambda r: _acc(r["accuracy"]), "batch", bold_best=True)
    lines += ["", f"The paper's aggregate, mean of the best n−1 of n seeds (%):", ""]
    lines += _grid_table(rows, lambda r: _pct(r["accuracy"]["best_n_minus_1_mean"]), "batch")
    lines += ["", "Fraction of seeds whose training loss became non-finite:", ""]
    lines += _grid_table(rows, lambda r: f"{r['diverged_fraction']:.2f}", "batch")
    at_chance = record["verdicts"].get("at_chance")
    if at_chance:
        lines += ["", f"Fraction of seeds that did not train (test top-1 below "
                      f"{_pct(record['verdicts']['chance_threshold'], 0)} %, diverged or not):", ""]
        lines += _grid_table(rows, lambda r: f"{at_chance[str(r['batch'])][r['series']]:.2f}", "batch")
    clip_rows = [r for r in rows if "clip_fraction" in r]
    if clip_rows:
        stages = list(clip_rows[0]["clip_fraction"])
        lines += ["", "Fraction of conv-weight units AGC clipped, per stage, averaged over all steps and seeds (%):", "",
                  "| batch | λ | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
        for r in sorted(clip_rows, key=lambda r: (r["batch"], r["clipping"])):
            lines.append(f"| {r['batch']} | {_lam(r['clipping'])} | "
                         + " | ".join(_pct(r["clip_fraction"][st], 1) for st in stages) + " |")
    lines += [""] + _agc_verdicts(record) + _training_time(record)
    lines += ["", _footer(record)]
    return "\n".join(lines)


def _training_time(record: dict[str, Any]) -> list[str]:
    """The summed time of a study's training runs: a resumed study's own runtime covers only the
    runs its last session trained."""
    if "run_minutes_total" not in record:
        return []
    return ["", f"Training time of all {len(record['runs'])} runs, summed (runs stored by an earlier session of the "
                f"command included): {record['run_minutes_total']:.1f} min."]


# ---------------------------------------------------------------- 2. NF vs BN

def _nf_vs_bn(record: dict[str, Any], doc_dir: str) -> str:
    s, r = record["settings"], record["results"]
    t = {name: row["step_time"] for name, row in r.items()}
    lines = [
        f"## {TITLES['nf_vs_bn']}",
        "",
        f"The NFNet block architecture (`nfnet_f0` with depths {s['depths']}, widths {s['widths']}, group "
        f"size {s['group_size']}) with its NF default and with `norm=\"batchnorm\"` (BatchNorm before every "
        "activation instead of Scaled WS, no γ/α/β scaling). Step time: the library's train step "
        f"(`train.step.make_train_step`, SGD, no AGC for either), Fashion-MNIST {s['image_size']} px, batch "
        f"{s['batch']}, f32, {s['repeats']} interleaved repeats of {s['steps_per_repeat']} steps. Memory: XLA's memory "
        "analysis of the compiled step (arguments + outputs + temporaries − donated). Accuracy: "
        f"{record['steps']} steps ({s['epochs']:g} epochs of {record['num_train']} images) at LR {record['lr']:g}, "
        f"NF with AGC λ={_lam(s['clipping'])}, BN without, seeds {', '.join(map(str, s['seeds']))}.",
        "",
        _figure(record, doc_dir, alt="NF vs BN"),
        "",
        "| model | step (ms, median) | per repeat (ms) | peak memory (MiB) | temporaries (MiB) | test top-1 (%), mean ± sd | per seed (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in r.items():
        acc = row["accuracy"]
        lines.append(f"| {name} | {1e3 * t[name]['median_s']:.2f} | "
                     f"{', '.join(f'{1e3 * x:.2f}' for x in t[name]['per_repeat_s'])} | "
                     f"{row['memory']['peak_estimate'] / 2**20:.2f} | {row['memory']['temp_size_in_bytes'] / 2**20:.2f} | "
                     f"{_acc(acc)} | {', '.join(_pct(x) for x in acc['per_seed'])} |")
    v = record["verdicts"]
    difference, time = v["accuracy"], v["time"]
    if time["consistent"]:
        timing = ("the BN step is slower in every interleaved repeat" if time["repeats_bn_slower"] else
                  "the BN step is faster in every interleaved repeat")
    else:
        timing = (f"BN slower in {time['repeats_bn_slower']} of {time['repeats']} interleaved repeats only: no "
                  "consistent difference under this load")
    lines += [
        "",
        "**Verdicts** (`experiments.reproduce.nf_vs_bn_verdicts`):",
        "",
        f"- *Accuracy* — NF − BN: {_spread(difference)}. "
        + ("The two cannot be told apart at this size." if not difference["exceeds_spread"] else
           ("NF is more accurate here." if difference["difference"] > 0 else "BN is more accurate here.")),
        f"- *Step time* — BN / NF ×{time['median_ratio']:.3f} by the median, ×{time['min_ratio']:.3f} … "
        f"×{time['max_ratio']:.3f} per repeat: {timing}.",
        f"- *Memory* — the BN step's peak estimate is ×{v['memory_ratio']:.3f} the NF step's.",
        "",
        "At this scale the convolutions are tiny, so BatchNorm's extra passes over the activations are a small "
        "share of a step; the paper's speed claim is about large models on accelerators, which this does not test.",
        "",
        _footer(record)]
    return "\n".join(lines)


# ---------------------------------------------------------------- 3. cost

def _cost(record: dict[str, Any], doc_dir: str) -> str:
    p = record["paper"]
    lines = [
        f"## {TITLES['cost']}",
        "",
        "The library's train step on one CPU device, f32, every variant compiled once and timed round-robin "
        "(plain, AGC, modified SAM, full SAM, then again), at batches whose ascent share is a whole number of "
        f"images. Targets from the issue: AGC costs at most ×{p['agc_target']:g} a plain step; the modified SAM "
        f"(ascent on the first {_pct(p['ascent_fraction'], 0)} % of the batch, unsynced) at most "
        f"×{p['modified_sam_target']:g} a step without SAM (the paper: ×{p['modified_sam_reported'][0]:g}–"
        f"×{p['modified_sam_reported'][1]:g}; full SAM about ×{p['full_sam_reported']:g}).",
        "",
        _figure(record, doc_dir, alt="cost of AGC and SAM"),
        "",
        "| model | variant | step (s, median) | per repeat (s) | × plain (median) | × AGC (median) | peak memory (MiB) | memory × plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, result in record["results"].items():
        for variant, timing in result["timings"].items():
            repeats = ", ".join(f"{x:.4g}" for x in timing["per_repeat_s"])
            lines.append(f"| {model} ({result['image_size']} px, batch {result['batch']}) | {variant} | "
                         f"{timing['median_s']:.4g} | {repeats} | {result['ratio_to_plain'][variant]:.3f} | "
                         f"{result['ratio_to_agc'][variant]:.3f} | {result['memory'][variant]['peak_estimate'] / 2**20:.1f} | "
                         f"{result['memory_ratio_to_plain'][variant]:.3f} |")
    lines += ["", "**Verdicts** (per interleaved repeat, each variant against the baseline timed in the same round):", ""]
    for model, entries in record["verdicts"].items():
        result = record["results"][model]
        for variant, e in entries.items():
            lines.append(
                f"- *{model}, {variant} ≤ ×{e['target']:g} {e['baseline']}* — {_answer(e['answer'])}: "
                f"×{e['median_ratio']:.3f} by the median, ×{e['min_ratio']:.3f} … ×{e['max_ratio']:.3f} over the "
                f"repeats, {e['repeats_met']} of {e['repeats']} repeats within the target.")
        full = result["ratio_to_agc"].get("AGC + full SAM")
        lines.append(f"- *{model}*: the modified SAM's ascent takes floor({p['ascent_fraction']:g} × {result['batch']}) "
                     f"= {result['ascent_images']} images, {_pct(result['ascent_share'], 1)} % of the batch"
                     + (f"; full SAM costs ×{full:.3f} an AGC step." if full is not None else "."))
    lines += ["", _footer(record)]
    return "\n".join(lines)


# ---------------------------------------------------------------- 4. signal propagation

def _spp_rows(verdicts: Mapping[str, Any], models: Sequence[str], probes: Sequence[str]) -> list[str]:
    lines = ["| model | input | last block variance | variance / (1 + kα²): min … max | within ×/÷ factor | "
             "residual branch variance by stage |", "|---|---|---|---|---|---|"]
    for model in models:
        for probe in probes:
            e = verdicts["models"].get(model, {}).get(probe)
            if e is None:
                continue
            ratio = (f"{_sig(e['ratio_min'])} … {_sig(e['ratio_max'])}" if "ratio_min" in e else "— (no analytic curve)")
            tracks = ("yes" if e["tracks"] else "no") if "tracks" in e else "—"
            branch = ", ".join(f"stage {k}: {_sig(x)}" for k, x in e["branch_variance_by_stage"].items())
            lines.append(f"| {model} | {probe} | {_sig(e['last_variance'], 4)} | {ratio} | {tracks} | {branch} |")
    return lines


def _spp(record: dict[str, Any], doc_dir: str) -> str:
    s, v = record["settings"], record["verdicts"]
    factor = v["tracking_factor"]
    probes = list(record["results"]["probes"])
    lines = [
        f"## {TITLES['spp']}",
        "",
        f"Signal propagation plots at initialisation (every skip gain set to 1), batch {s['batch']}, "
        f"{s['resolution']} px: per block, the mean over channels of the squared mean and of the variance of the "
        "block's output, and the variance of its residual branch. First the NF-ResNet paper's own comparison, "
        f"{' vs '.join(s['resnets'])} on white noise, against the analytic variance 1 + kα² the NF model's β "
        f"schedule assumes (dashed). Then {', '.join(s['models'])} on three inputs: white noise (the paper's "
        "probe), image-like noise (smoothed, `analysis.signal_propagation.smooth_images`) and real images "
        "(Fashion-MNIST test images resized, grey replicated to RGB, standardised per channel). 'Within ×/÷ "
        f"{factor:g}' asks whether every block's variance is within a factor {factor:g} of 1 + kα².",
        "",
        _figure(record, doc_dir, 0, "SPP, NF-ResNet vs BN-ResNet"),
        "",
    ]
    lines += _spp_rows(v, list(s["resnets"]), ["gaussian"])
    for index, probe in enumerate(probes, start=1):
        lines += ["", f"*{record['titles'][probe]}:*", "", _figure(record, doc_dir, index, f"SPP, {probe}")]
    lines += [""] + _spp_rows(v, list(s["models"]), probes)
    lines += ["", "**Reading.** The table is the verdict: where 'within' says no, the model's signal does not "
              "follow the analytic curve on that input; the residual branch variances show how much of its input "
              "variance each stage's branch keeps (the paper's design assumes about 1 at initialisation). "
              "Nothing here is a statement about training. A likely cause of the real images' low variances, not "
              "tested here: Scaled WS makes every filter zero-mean, so locally constant input (flat backgrounds, "
              "and the smooth regions of images upsampled several-fold) gives almost no response.", "", _footer(record)]
    return "\n".join(lines)


def _agc_steps(record: dict[str, Any], doc_dir: str) -> str:
    s, rows, reference = record["settings"], record["rows"], record["reference_rows"]
    steps = sorted({r["steps"] for r in rows})
    batches = ", ".join(map(str, record["batches_done"]))
    references = ", ".join(map(str, record["reference_batches"])) or "none"
    lines = [
        f"## {TITLES['agc_steps']}",
        "",
        f"Design. Section 1 trains every batch for the same epochs, so its largest batch also gets the fewest "
        f"steps. Here batch {batches} trains for {s['epochs']:g} epochs, {', '.join(map(str, steps))} steps: the step "
        f"count of batch {references} in section 1, whose rows are shown beside it (same network, data, LR rule "
        f"{s['base_lr']:g} × batch/{s['base_batch']}, warmup fraction, schedule and seeds "
        f"{', '.join(map(str, s['seeds']))}). λ grid: {', '.join(_lam(c) for c in s['clippings'])}, extended as in "
        f"section 1 at most {s['max_extensions']} times. The verdicts below are section 1's rules applied to these "
        "batches, so the design check now compares two batch sizes at equal steps.",
        "",
        _figure(record, doc_dir, alt="AGC at the largest batch with a smaller batch's step count"),
        "",
        "Test top-1 (%), mean ± sd over all seeds (bold: best of the batch):",
        "",
    ]
    both = reference + rows
    lines += _grid_table(both, lambda r: _acc(r["accuracy"]), "batch", bold_best=True)
    lines += ["", "Fraction of seeds whose training loss became non-finite:", ""]
    lines += _grid_table(both, lambda r: f"{r['diverged_fraction']:.2f}", "batch")
    lines += [""] + _agc_verdicts(record) + _training_time(record)
    lines += ["", _footer(record)]
    return "\n".join(lines)


TITLES = {
    "agc": "1. AGC vs batch size: large-batch, large-LR training of NF-ResNets (paper §4.1, Fig. 2)",
    "agc_steps": "1b. The largest batch again, with a smaller batch's step count",
    "nf_vs_bn": "2. Normalizer-free vs BatchNorm: accuracy, step time and memory (paper §3, §5)",
    "cost": "3. The cost of AGC and of the modified SAM (paper §4, §6.1)",
    "spp": "4. Signal propagation: the NF-ResNet paper's figure, and real images (NF-ResNet paper §4)",
}
SECTIONS = {"agc": _agc, "agc_steps": _agc_steps, "nf_vs_bn": _nf_vs_bn, "cost": _cost, "spp": _spp}


# ---------------------------------------------------------------- the verdicts at a glance

GLANCE_NAMES = {"agc": "AGC vs batch, same epochs at every batch", "agc_steps": "AGC vs batch, equal steps",
                "nf_vs_bn": "NF vs BN", "cost": "Cost of AGC and SAM", "spp": "Signal propagation"}


def _agc_glance(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if "bn_across_batches" in v:
        b = v["bn_across_batches"]
        rows.append((f"Design check: {b['steps_large']} steps are enough to train at batch {b['large_batch']} "
                     "(the BN-ResNet across batches)", "yes" if b["enough_steps"] else "no"))
    for key, claim in (("unclipped_degrades", "Without AGC, the NF-ResNet degrades at large batch"),
                       ("agc_matches_bn", "With AGC, the NF-ResNet matches BN up to the largest batch"),
                       ("smaller_lambda_at_larger_batch", "The best λ is smaller at larger batch")):
        if key in v:
            rows.append((claim, v[key]["answer"]))
    return rows


def _nf_vs_bn_glance(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    accuracy, time = v["accuracy"], v["time"]
    as_accurate = accuracy["difference"] >= 0 or not accuracy["exceeds_spread"]  # NF − BN
    slower = ("yes" if time["consistent"] and time["repeats_bn_slower"] == time["repeats"] else
              "no" if time["consistent"] else "no consistent difference")
    return [("The NF model is as accurate as BN (within the seed spread)", "yes" if as_accurate else "no"),
            ("BN's step is slower, in every interleaved repeat", slower),
            ("BN's step needs more memory", "yes" if v["memory_ratio"] > 1 else "no")]


def _cost_glance(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(f"{model}: {variant} ≤ ×{entry['target']:g} {entry['baseline']}", entry["answer"])
            for model, by_variant in v.items() for variant, entry in by_variant.items()]


def _spp_glance(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(f"{model} on {probe} inputs: every block's variance within ×/÷ {v['tracking_factor']:g} of 1 + kα²",
             "yes" if entry["tracks"] else "no")
            for model, by_probe in v["models"].items() for probe, entry in by_probe.items() if "tracks" in entry]


GLANCE = {"agc": _agc_glance, "agc_steps": _agc_glance, "nf_vs_bn": _nf_vs_bn_glance, "cost": _cost_glance,
          "spp": _spp_glance}


def _at_a_glance(records: Mapping[str, dict[str, Any]]) -> str:
    """One row per sub-claim with the verdict its section computed: where the page says no, it
    says so first."""
    lines = ["## The verdicts at a glance", "",
             "Each sub-claim with the verdict its section below computes from the measurements; the numbers, "
             "the rule and the design are in that section.", "",
             "| study | sub-claim | verdict |", "|---|---|---|"]
    for claim, record in records.items():
        lines += [f"| {GLANCE_NAMES[claim]} | {text} | {_answer(answer)} |"
                  for text, answer in GLANCE[claim](record["verdicts"])]
    return "\n".join(lines) + "\n"


def render(out: str, doc_path: str) -> str:
    """The page's Markdown from the claim JSONs in `out` (figures linked relative to `doc_path`)."""
    doc_dir = os.path.dirname(os.path.abspath(doc_path))
    records = {claim: _read(out, claim) for claim in SECTIONS}
    parts = [TITLE, "", INTRO]
    if any(records.values()):
        parts.append(_at_a_glance({claim: record for claim, record in records.items() if record is not None}))
    for claim, section in SECTIONS.items():
        record = records[claim]
        if record is None:
            parts.append(f"## {TITLES[claim]}\n\n*Pending: not run in this session. "
                         f"`python -m experiments.reproduce --only {claim}` produces it.*\n")
            continue
        # Figures sit next to their JSON; the page links them relative to itself.
        record["figures"] = [os.path.abspath(os.path.join(out, os.path.basename(p))) for p in record["figures"]]
        parts.append(section(record, doc_dir))
    return "\n".join(parts)


def write(out: str, doc_path: str) -> str:
    """(Re)writes `doc_path` from the claim JSONs in `out`; returns the path."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    from nfnets_jax.runtime import workdir  # pylint: disable=import-outside-toplevel

    text = render(out, doc_path)
    os.makedirs(os.path.dirname(os.path.abspath(doc_path)), exist_ok=True)
    workdir.write_text_atomically(epath.Path(doc_path), text)
    return doc_path
