"""docs/memory_plan.md's tables and verdicts, rendered from the records `experiments.memory_plan --json` wrote.

A memory plan typed by hand goes stale the day the step changes (the TPU compiler's plan of F0 moved
by a sixth between two weeks' commits). So the page shows only what its records say: each record is
one compile (a config, a per-device batch, a target, remat off or on) appended to
docs/memory_plan.jsonl by the command; a later record of the same compile replaces an earlier one, so
re-running a config refreshes its row. Each table line joins a config's two compiles (remat off → on)
on one target, and every verdict ("fits as it is", "only with remat", ...) is computed here from the
sizes, never written by hand.

    python -m experiments.memory_plan --target tpu-v3 --only nfnet.py:F0 --json >> docs/memory_plan.jsonl
    python -m experiments.memory_plan --table docs/memory_plan.jsonl --into docs/memory_plan.md
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from . import memory_plan

Record = dict[str, Any]
Key = tuple[str, int, str]  # (config, per-device batch, target)

# The page's generated sections: name -> which records' configs it shows.
SECTIONS: dict[str, Callable[[str], bool]] = {
    "nfnet": lambda config: config.startswith("nfnet.py:") and not config.endswith("+"),
    "nfnet_plus": lambda config: config.startswith("nfnet.py:") and config.endswith("+"),
    "nf_resnet_regnet": lambda config: config.startswith(("nf_resnet.py:", "nf_regnet.py:")),
}


def latest(records: Sequence[Record]) -> dict[Key, dict[bool, Record]]:
    """(config, batch, target) -> {remat: record}, the last record of each compile winning."""
    compiles: dict[Key, dict[bool, Record]] = {}
    for record in records:
        key = (record["config"], record["per_device_batch"], record.get("target", memory_plan.HERE))
        compiles.setdefault(key, {})[bool(record["remat"])] = record
    return compiles


def _order(key: Key) -> tuple:
    """Configs in the plan's order (F0 … F7, F0+ …, NF-ResNets by depth, NF-RegNets), the recipe's
    batch before smaller ones, TPU generations in order."""
    config, batch, target = key
    specs = memory_plan.all_config_specs()
    position = specs.index(config) if config in specs else len(specs)
    return position, config, -batch, target


def _device_hbm_gib(target: str) -> float | None:
    tpu = memory_plan.TPU_TARGETS.get(target)
    return None if tpu is None else tpu.hbm_gib


def fits(record: Record | None, target: str) -> bool | None:
    """Whether the compile's peak is within HEADROOM of the target's device: False for a compile the
    TPU compiler refused, None when it was not compiled or the device's memory is not known here."""
    hbm = _device_hbm_gib(target)
    if record is None or hbm is None:
        return None
    if record.get("out_of_memory"):
        return False
    return record["peak_gib"] <= memory_plan.HEADROOM * hbm


def _gib(value: float | None) -> str:
    return "?" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _temporaries(record: Record | None) -> str:
    if record is None:
        return "(not compiled)"
    if record.get("out_of_memory"):
        return f"≥ {_gib(record['temp_gib'])} (refused)" if record.get("temp_gib") is not None else "(refused)"
    return _gib(record["temp_gib"])


def _peak(record: Record | None) -> str:
    if record is None:
        return "—"
    if record.get("out_of_memory"):
        return f"does not fit (> {_gib(record.get('peak_at_least_gib'))})"
    return _gib(record["peak_gib"])


def _tflop(record: Record | None) -> str:
    if record is None or record.get("gflops") is None:
        return "—"
    return f"{record['gflops'] / 1e3:.1f}"


def _answer(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "—"}[value]


def _compiled(record: Record | None) -> str:
    if record is None:
        return "—"
    return f"{record['compile_s']:.0f}"


def markdown_table(compiles: dict[Key, dict[bool, Record]]) -> str:
    """One line per (config, batch, target): sizes, FLOPs, fit and compile time with remat off → on."""
    head = ("| config | target | px | batch / device | dtype | state + batch (GiB) | temporaries (GiB), "
            "remat off → on | **peak (GiB), remat off → on** | step TFLOP, off → on | fits the device "
            "(10% headroom), off / on | compile s, off / on | compiled |")
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for key in sorted(compiles, key=_order):
        config, batch, target = key
        off, on = compiles[key].get(False), compiles[key].get(True)
        some = off or on
        state = next((r["argument_gib"] for r in (off, on) if r and not r.get("out_of_memory")), None)
        dated = sorted({f"{r['date']}, jax {r['jax']}" + (f", libtpu {r['libtpu']}" if r.get("libtpu") else "")
                        for r in (off, on) if r})
        lines.append(" | ".join([
            f"| {config}", target if target != memory_plan.HERE else some["compiled_for"], str(some["image_size"]),
            str(batch), some["compute_dtype"], _gib(state) if state is not None else "—",
            f"{_temporaries(off)} → {_temporaries(on)}", f"**{_peak(off)} → {_peak(on)}**",
            f"{_tflop(off)} → {_tflop(on)}", f"{_answer(fits(off, target))} / {_answer(fits(on, target))}",
            f"{_compiled(off)} / {_compiled(on)}", "; ".join(dated)]) + " |")
    return "\n".join(lines)


def _short(config: str) -> str:
    """`nfnet.py:F3` -> `F3`, `nf_resnet.py:50` -> `NF-ResNet-50`, `nf_regnet.py:B2` -> `NF-RegNet-B2`."""
    file_name, _, arg = config.partition(":")
    return {"nfnet.py": arg, "nf_resnet.py": f"NF-ResNet-{arg}", "nf_regnet.py": f"NF-RegNet-{arg}"}.get(
        file_name, config)


def _ranges(names: Sequence[str]) -> str:
    """Consecutive `F2`, `F3`, `F4` as `F2–F4` (`NF-RegNet-B0`…`B2` as `NF-RegNet-B0–B2`); anything
    else listed as it is."""
    parts: list[list[str]] = []
    for name in names:
        match = re.fullmatch(r"(.*?)(\d+)(\+?)", name)
        if parts and match:
            last = re.fullmatch(r"(.*?)(\d+)(\+?)", parts[-1][-1])
            if (last and last.group(1) == match.group(1) and last.group(3) == match.group(3)
                    and int(match.group(2)) == int(last.group(2)) + 1):
                parts[-1].append(name)
                continue
        parts.append([name])
    def span(group: list[str]) -> str:  # NF-RegNet-B0–B4: the last name without the family's prefix
        prefix = group[0].rsplit("-", 1)[0] + "-" if "-" in group[0] else ""
        return group[0] if len(group) == 1 else f"{group[0]}–{group[-1].removeprefix(prefix)}"

    return ", ".join(span(group) for group in parts)


# verdict -> (said of several configs, said of one)
_VERDICT_WORDS = {
    "as is": ("fit as they are", "fits as it is"),
    "remat": ("fit only with remat", "fits only with remat"),
    "remat, not compiled without": ("fit with remat (not compiled without)", "fits with remat (not compiled without)"),
    "no": ("do not fit even with remat", "does not fit even with remat"),
    "unknown": ("are not judged yet (compile them with remat)", "is not judged yet (compile it with remat)"),
}


def _span_text(values: Sequence[float], template: str) -> str:
    low, high = template.format(min(values)), template.format(max(values))
    return low if low == high else f"{low} to {high}"


def verdicts(compiles: dict[Key, dict[bool, Record]], target: str) -> str:
    """One sentence per per-device batch on `target`: which configs fit as they are, only with remat,
    not even with remat (computed from `fits`), and which could not be judged yet."""
    by_batch: dict[int, dict[str, list[str]]] = {}
    for key in sorted(compiles, key=_order):
        config, batch, key_target = key
        if key_target != target:
            continue
        off, on = compiles[key].get(False), compiles[key].get(True)
        if fits(off, target):
            verdict = "as is"
        elif fits(on, target):
            verdict = "remat" if off is not None else "remat, not compiled without"
        elif fits(on, target) is False:  # what does not fit with remat does not fit without it either
            verdict = "no"
        else:
            verdict = "unknown"
        by_batch.setdefault(batch, {}).setdefault(verdict, []).append(_short(config))
    label = memory_plan.TPU_TARGETS[target].label if target in memory_plan.TPU_TARGETS else target
    sentences = []
    for batch, groups in by_batch.items():
        said = "; ".join(f"{_ranges(names)} {_VERDICT_WORDS[verdict][len(names) == 1]}"
                         for verdict, names in groups.items())
        sentences.append(f"At {batch} images per {label}: {said}.")
    return " ".join(sentences)


def remat_effect(compiles: dict[Key, dict[bool, Record]]) -> str:
    """What remat did where both compiles succeeded: temporaries on/off and FLOPs on/off, as ranges."""
    temps, flops = [], []
    for versions in compiles.values():
        off, on = versions.get(False), versions.get(True)
        if off and on and not off.get("out_of_memory") and not on.get("out_of_memory"):
            temps.append(on["temp_gib"] / off["temp_gib"])
            if off.get("gflops") and on.get("gflops"):
                flops.append(on["gflops"] / off["gflops"] - 1)
    if not temps:
        return "No config has both compiles yet, so what remat saves is not shown."
    flop_text = f", for {_span_text(flops, '{:+.0%}')} step FLOPs" if flops else ""
    configs = f"{len(temps)} config{'s' if len(temps) > 1 else ''}"
    return (f"Where both compiles succeeded ({configs}), remat cut the temporaries to "
            f"{_span_text(temps, '{:.2f}×')} of those without it{flop_text} (XLA's own FLOP count: the "
            "recomputed forward).")


def sections(records: Sequence[Record]) -> dict[str, str]:
    """Generated section name -> its Markdown: each section's table, then its verdicts per target."""
    rendered = {}
    for name, shows in SECTIONS.items():
        compiles = {key: value for key, value in latest(records).items() if shows(key[0])}
        if not compiles:
            rendered[name] = "No records yet: run the command above for these configs."
            continue
        targets = sorted({key[2] for key in compiles if key[2] in memory_plan.TPU_TARGETS})
        text = [markdown_table(compiles), ""]
        text += [verdicts(compiles, target) for target in targets]
        text += ["", remat_effect(compiles)]
        rendered[name] = "\n".join(text)
    return rendered
