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

from . import generated_section, memory_plan

Record = dict[str, Any]
Key = tuple[str, int, str]  # (config, per-device batch, target)

# The page's generated sections: name -> which records' configs it shows.
SECTIONS: dict[str, Callable[[str], bool]] = {
    "nfnet": lambda config: config.startswith("nfnet.py:") and not config.endswith("+"),
    "nfnet_plus": lambda config: config.startswith("nfnet.py:") and config.endswith("+"),
    "nf_resnet_regnet": lambda config: config.startswith(("nf_resnet.py:", "nf_regnet.py:")),
}


REQUIRED = ("config", "per_device_batch", "remat", "compiled_for", "image_size", "compute_dtype", "compile_s")


def check(records: Sequence[Record]) -> None:
    """One clear ValueError naming the first record (1-based) that lacks what the page reads."""
    for number, record in enumerate(records, 1):
        missing = [name for name in REQUIRED if record.get(name) is None]
        sizes = () if record.get("out_of_memory") else ("argument_gib", "temp_gib", "peak_gib")  # refused: none
        missing += [name for name in sizes if not isinstance(record.get(name), (int, float))]
        if missing:
            raise ValueError(f"record {number} ({record.get('config', '?')}) has no {', '.join(missing)}; "
                             "write records with `experiments.memory_plan --json`")


def _target(record: Record) -> str:
    """A TPU target's name, or for a compile for the local backend the device it compiled for (so
    a CPU host's and a GPU host's records stay apart)."""
    target = record.get("target", memory_plan.HERE)
    return target if target in memory_plan.TPU_TARGETS else record["compiled_for"]


def latest(records: Sequence[Record]) -> dict[Key, dict[bool, Record]]:
    """(config, batch, target) -> {remat: record}, the last record of each compile winning."""
    compiles: dict[Key, dict[bool, Record]] = {}
    for record in records:
        key = (record["config"], record["per_device_batch"], _target(record))
        compiles.setdefault(key, {})[bool(record["remat"])] = record
    return compiles


def _order(key: Key) -> tuple:
    """Configs in the plan's order (F0 … F7, F0+ …, NF-ResNets by depth, NF-RegNets), the recipe's
    batch before smaller ones, TPU generations in order, then other compilers."""
    config, batch, target = key
    return memory_plan.spec_order(config), -batch, memory_plan.target_order(target), target


def fits(record: Record | None, target: str) -> bool | None:
    """Whether the compile's peak is within HEADROOM of the target's device: False for a compile the
    TPU compiler refused, None when it was not compiled or the target is not a TPU (then the
    device's memory is not known here)."""
    if record is None or target not in memory_plan.TPU_TARGETS:
        return None
    if record.get("out_of_memory"):
        return False
    return memory_plan.fits_target(record["peak_gib"], target)


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
        tpu = target in memory_plan.TPU_TARGETS
        dated = sorted({f"{r.get('date', '?')}, jax {r.get('jax', '?')}"
                        + (f", libtpu {r.get('libtpu', '?')}" if tpu else "") for r in (off, on) if r})
        lines.append(" | ".join([
            f"| {config}", target, str(some["image_size"]),
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
    for batch, groups in sorted(by_batch.items(), key=lambda item: -item[0]):
        said = "; ".join(f"{_ranges(names)} {_VERDICT_WORDS[verdict][len(names) == 1]}"
                         for verdict, names in groups.items())
        sentences.append(f"At {batch} images per {label}: {said}.")
    return " ".join(sentences)


def remat_effect(compiles: dict[Key, dict[bool, Record]], target: str) -> str:
    """What remat did on `target` where both compiles succeeded: temporaries with / without remat and
    FLOPs with / without, as ranges over those configs."""
    temps, flops, configs = [], [], set()
    for (config, _, key_target), versions in compiles.items():
        off, on = versions.get(False), versions.get(True)
        if key_target == target and off and on and not off.get("out_of_memory") and not on.get("out_of_memory"):
            configs.add(config)
            temps.append(on["temp_gib"] / off["temp_gib"])
            if off.get("gflops") and on.get("gflops"):
                flops.append(on["gflops"] / off["gflops"] - 1)
    if not temps:
        return f"On {target}, no config has both compiles yet, so what remat changes is not shown."
    verb = "cut" if max(temps) < 1 else "changed"
    flop_text = f", for {generated_section.value_range(flops, '{:+.0%}')} step FLOPs" if flops else ""
    return (f"On {target}, where both compiles succeeded ({len(configs)} config{'s' if len(configs) > 1 else ''}), "
            f"remat {verb} the temporaries to {generated_section.value_range(temps, '{:.2f}×')} of those without it{flop_text} "
            "(XLA's own FLOP count: the recomputed forward).")


def not_compiled(compiles: dict[Key, dict[bool, Record]], shows: Callable[[str], bool]) -> str:
    """The section's configs of the plan that no record covers yet ('' when every one is covered)."""
    covered = {key[0] for key in compiles}
    missing = [_short(spec) for spec in memory_plan.all_config_specs() if shows(spec) and spec not in covered]
    return f"Not compiled yet: {_ranges(missing)}." if missing else ""


def sections(records: Sequence[Record]) -> dict[str, str]:
    """Generated section name -> its Markdown: each section's table, its verdicts per TPU target,
    what remat changed, and the configs of the plan not compiled yet. ValueError on a bad record."""
    check(records)
    rendered, every_compile = {}, latest(records)
    for name, shows in SECTIONS.items():
        compiles = {key: value for key, value in every_compile.items() if shows(key[0])}
        missing = not_compiled(compiles, shows)
        if not compiles:
            rendered[name] = "No records yet: run the command above for these configs. " + missing
            continue
        targets = sorted({key[2] for key in compiles if key[2] in memory_plan.TPU_TARGETS}, key=memory_plan.target_order)
        paragraphs = [markdown_table(compiles)]
        paragraphs += [verdicts(compiles, target) for target in targets]
        paragraphs += [remat_effect(compiles, target) for target in targets]
        paragraphs += [missing] if missing else []
        rendered[name] = "\n\n".join(paragraphs)
    return rendered
