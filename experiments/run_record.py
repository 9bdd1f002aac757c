"""Writes the record of a finished training run, the JSON and curves that docs/results/ keep,
and renders a docs page's section from such records.

    python -m experiments.run_record --workdir=/work/runs/fashion_mnist_ref \
        --out=docs/results/fashion_mnist_reference --wall_seconds=4321 --target_top_1=0.93
    python -m experiments.run_record --page=docs/fashion_mnist.md \
        --records=docs/results/fashion_mnist_reference.json,docs/results/fashion_mnist_narrow.json

Reads what `experiments.train` left in the workdir (metrics.jsonl, config.json, provenance.json,
training_curves.png) and writes `<out>.json` (the command, the final raw and EMA test metrics,
every evaluation, the model's size, the summed step times, the wall-clock time if given, the
versions and machine) and `<out>.png` (a copy of the curves). A docs page then quotes the JSON,
so its numbers are the run's, not retyped ones (docs/fashion_mnist.md).

With `--page`, the page's generated section "runs" (`experiments.generated_section`) is rewritten
from the records: the first in detail (command, result against its target, evaluations, curves,
machine and versions), every one as a row of a comparison table. tests/test_docs_pages.py renders
the records again and compares.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from nfnets_jax.runtime import provenance
from nfnets_jax.train import loop, metrics_logging

from . import command_line, generated_section

FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_string("workdir", None, "The finished run's workdir.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Path without suffix: writes OUT.json, OUT.png.", flag_values=FLAGS)
flags.DEFINE_float("wall_seconds", None, "Wall-clock time of the run, measured around its command(s).",
                   flag_values=FLAGS)
flags.DEFINE_float("target_top_1", None, "The test top-1 (EMA, as a fraction) the run was meant to "
                   "reach; the page says whether it did.", flag_values=FLAGS)
flags.DEFINE_string("page", None, "Render this page's generated section 'runs' from --records "
                    "instead of writing a record.", flag_values=FLAGS)
flags.DEFINE_list("records", [], "With --page: record JSON files, the one shown in detail first.",
                  flag_values=FLAGS)
SECTION = "runs"


def train_seconds(records: Sequence[dict[str, Any]]) -> float:
    """Time in train steps: each train record's mean step time × the steps since the previous one.

    Leaves out what the runner leaves out of its step times: the first step (compilation),
    evaluations and checkpoint saves.
    """
    total, previous = 0.0, 0
    for record in records:
        if record["split"] == "train" and "step_time" in record:
            total += record["step_time"] * (record["step"] - previous)
            previous = record["step"]
    return total


def training_command(run_provenance: dict[str, Any]) -> str:
    """The `python -m experiments.train ...` command of a run, from its provenance.json's argv."""
    return " ".join(["python -m experiments.train", *run_provenance["argv"][1:]])


def run_record(workdir: str, wall_seconds: float | None = None,
               target_top_1: float | None = None) -> dict[str, Any]:
    """The run's record (module docstring); raises ValueError if the run has no evaluation."""
    # pylint: disable=import-outside-toplevel
    import ml_collections

    from nfnets_jax import data as data_lib
    from nfnets_jax.models import registry

    records = metrics_logging.read_metrics(os.path.join(workdir, metrics_logging.METRICS_FILE))
    evals = [r for r in records if r["split"] == "eval"]
    if not evals:
        raise ValueError(f"{workdir} holds no evaluation yet: let the run finish first.")
    with open(os.path.join(workdir, loop.CONFIG_FILE), encoding="utf-8") as file:
        config = json.load(file)
    with open(os.path.join(workdir, provenance.PROVENANCE_FILE), encoding="utf-8") as file:
        run_provenance = json.load(file)
    model, data = config["model"], config["data"]
    info = data_lib.dataset_info(ml_collections.ConfigDict(data))
    macs, params = registry.macs_and_params(model["name"], data["image_size"],
                                            num_classes=info.num_classes, **model["kwargs"])
    final = evals[-1]
    return {
        "command": training_command(run_provenance),
        "model": {"name": model["name"], "kwargs": model["kwargs"], "params": params,
                  "float32_megabytes": round(params * 4 / 2**20, 2), "macs_per_image": macs},
        "data": {"name": data["name"], "train_split": data["train_split"],
                 "eval_split": data["eval_split"], "image_size": data["image_size"]},
        "train": {"batch_size": config["train"]["batch_size"], "epochs": config["train"]["epochs"],
                  "steps": final["step"]},
        "final": {key: final[key] for key in ("step", "top_1_acc", "ema_top_1_acc", "top_5_acc",
                                              "ema_top_5_acc", "loss", "ema_loss", "num_examples")
                  if key in final},
        "evals": [{key: r[key] for key in ("step", "top_1_acc", "ema_top_1_acc") if key in r}
                  for r in evals],
        "train_step_seconds": round(train_seconds(records), 1),
        "wall_seconds": wall_seconds,
        "target_top_1": target_top_1,
        "provenance": run_provenance,
    }


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _minutes(seconds: float | None) -> str:
    return "not measured" if seconds is None else f"{seconds / 60:.0f} min"


def _model_cell(model: dict[str, Any]) -> str:
    kwargs = model["kwargs"]
    shown = [f"{name} {'-'.join(str(v) for v in kwargs[key])}"
             for name, key in (("depths", "depths"), ("widths", "widths"), ("stem", "stem_channels"))
             if key in kwargs]
    return f"{model['name']}: " + ", ".join(shown)


def _run_label(record: dict[str, Any]) -> str:
    git = record["provenance"].get("git") or {}
    return f"commit {provenance.short_commit(git)}{' (uncommitted changes)' if git.get('dirty') else ''}"


def _target_sentence(record: dict[str, Any]) -> str:
    target = record.get("target_top_1")
    if target is None:
        return ""
    reached = record["final"].get("ema_top_1_acc", record["final"]["top_1_acc"])
    gap = 100 * (reached - target)
    if gap >= 0:
        return f" The target, >= {_percent(target)}, is met (by {gap:.2f} points)."
    return f" The target, >= {_percent(target)}, is **not met**: {-gap:.2f} points short."


def render_runs(records: Sequence[dict[str, Any]], curves: str | None = None) -> str:
    """The page section for `records` (module docstring): markdown, every figure from the JSON."""
    if not records:
        raise ValueError("no records to render: pass --records.")
    first = records[0]
    final, train = first["final"], first["train"]
    epochs_per_step = train["epochs"] / train["steps"]
    ema = final.get("ema_top_1_acc")
    provenance_ = first["provenance"]
    versions, machine = provenance_.get("versions", {}), provenance_.get("machine", {})
    lines = [
        f"The run shown ({_run_label(first)}):", "",
        f"    {first['command']}", "",
        f"**Test top-1 {_percent(ema if ema is not None else final['top_1_acc'])}** "
        f"({'EMA parameters; raw ' + _percent(final['top_1_acc']) if ema is not None else 'raw parameters'}) "
        f"on the {int(final['num_examples']):,} test images after {train['epochs']:g} epochs "
        f"({train['steps']:,} steps of batch {train['batch_size']}).{_target_sentence(first)} "
        f"Wall time {_minutes(first.get('wall_seconds'))}, of which "
        f"{_minutes(first['train_step_seconds'])} in train steps, on a {machine.get('cpu_count', '?')}-core "
        f"{machine.get('machine', '')} CPU host shared with other jobs (Python {machine.get('python', '?')}, "
        f"jax {versions.get('jax', '?')}, TensorFlow {versions.get('tensorflow', '?')}, TFDS "
        f"{versions.get('tensorflow-datasets', '?')}).", "",
        "| epoch | step | test top-1, EMA | raw |", "|---|---|---|---|",
    ]
    for evaluation in first["evals"]:
        shown_ema = evaluation.get("ema_top_1_acc")
        lines.append(f"| {evaluation['step'] * epochs_per_step:.1f} | {evaluation['step']:,} | "
                     f"{'-' if shown_ema is None else _percent(shown_ema)} | {_percent(evaluation['top_1_acc'])} |")
    if curves:
        lines += ["", f"![Training curves of the run shown]({curves})"]
    lines += ["", "Every run of this config family kept in docs/results/:", "",
              "| run | model | parameters | multiply-adds / image | px | epochs | test top-1, EMA | raw | target | wall time |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        final_ = record["final"]
        target = record.get("target_top_1")
        lines.append(
            f"| {_run_label(record)} | {_model_cell(record['model'])} | {record['model']['params']:,} | "
            f"{record['model']['macs_per_image'] / 1e6:.1f} M | {record['data']['image_size']} | "
            f"{record['train']['epochs']:g} | "
            f"{'-' if final_.get('ema_top_1_acc') is None else _percent(final_['ema_top_1_acc'])} | "
            f"{_percent(final_['top_1_acc'])} | {'-' if target is None else '>= ' + _percent(target)} | "
            f"{_minutes(record.get('wall_seconds'))} |")
    return "\n".join(lines)


RENDERED_FROM = "<!-- rendered from: {} -->"


def rendered_from(section_text: str) -> list[str]:
    """The record files (relative to the page's folder) a rendered section names in its first line."""
    first = section_text.splitlines()[0] if section_text else ""
    prefix, suffix = RENDERED_FROM.split("{}")
    if not (first.startswith(prefix) and first.endswith(suffix)):
        raise ValueError(f"the section does not start with {RENDERED_FROM.format('FILES')}.")
    return [name.strip() for name in first[len(prefix):-len(suffix)].split(",")]


def render_section(page_dir: str, record_names: Sequence[str]) -> str:
    """The section "runs" of a page in `page_dir` from its record files (paths relative to it),
    starting with the line that names them."""
    records = []
    for name in record_names:
        with open(os.path.join(page_dir, name), encoding="utf-8") as file:
            records.append(json.load(file))
    curves = os.path.splitext(record_names[0])[0] + ".png"
    link = curves if os.path.exists(os.path.join(page_dir, curves)) else None
    return RENDERED_FROM.format(", ".join(record_names)) + "\n" + render_runs(records, link)


def render_page(page_path: str, record_paths: Sequence[str]) -> str:
    """The page at `page_path` with its section "runs" rendered from the record files."""
    page_dir = os.path.dirname(os.path.abspath(page_path))
    names = [os.path.relpath(os.path.abspath(path), page_dir) for path in record_paths]
    with open(page_path, encoding="utf-8") as file:
        page = file.read()
    return generated_section.replace_section(page, SECTION, render_section(page_dir, names))


def main(argv: Sequence[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False)
    args = FLAGS
    if args.page:
        try:
            page = render_page(args.page, args.records)
        except (ValueError, OSError, KeyError) as error:
            command_line.fail(error)
        with open(args.page, "w", encoding="utf-8") as file:
            file.write(page)
        print(f"{args.page}: section '{SECTION}' rendered from {len(args.records)} record(s).")
        return
    if not args.workdir or not args.out:
        command_line.fail("pass --workdir and --out (write a record) or --page and --records (render a page).")
    try:
        record = run_record(args.workdir, args.wall_seconds, args.target_top_1)
    except (ValueError, OSError) as error:
        command_line.fail(error)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.json", "w", encoding="utf-8") as file:
        json.dump(record, file, indent=2)
        file.write("\n")
    curves = os.path.join(args.workdir, metrics_logging.CURVES_FILE)
    if os.path.exists(curves):
        shutil.copyfile(curves, f"{args.out}.png")
    final = record["final"]
    print(f"{args.out}.json: step {final['step']}, test top-1 {100 * final['top_1_acc']:.2f}% raw, "
          f"{100 * final.get('ema_top_1_acc', float('nan')):.2f}% EMA")


if __name__ == "__main__":
    main()
