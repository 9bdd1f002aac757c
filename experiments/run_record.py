"""Writes the record of a finished training run, the JSON and curves that docs/results/ keep.

    python -m experiments.run_record --workdir=/work/runs/fashion_mnist_ref \
        --out=docs/results/fashion_mnist_reference --wall_seconds=4321

Reads what `experiments.train` left in the workdir (metrics.jsonl, config.json, provenance.json,
training_curves.png) and writes `<out>.json` (the command, the final raw and EMA test metrics,
every evaluation, the model's size, the summed step times, the wall-clock time if given, the
versions and machine) and `<out>.png` (a copy of the curves). A docs page then quotes the JSON,
so its numbers are the run's, not retyped ones (docs/fashion_mnist.md).
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

from . import command_line

FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_string("workdir", None, "The finished run's workdir.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Path without suffix: writes OUT.json, OUT.png.", flag_values=FLAGS)
flags.DEFINE_float("wall_seconds", None, "Wall-clock time of the run, measured around its command(s).",
                   flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


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


def run_record(workdir: str, wall_seconds: float | None = None) -> dict[str, Any]:
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
        "provenance": run_provenance,
    }


def main(argv: Sequence[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False)
    args = FLAGS
    try:
        record = run_record(args.workdir, args.wall_seconds)
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
