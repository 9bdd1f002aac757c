"""The AGC λ × batch-size study of the paper (Brock et al. 2021 §4.1, Figures 2 and 7;
docs/recipe.md): plan its runs, then collect them into the figure.

    # 1. one launch command per run (stdout) and ROOT/plan.json; run them however you launch jobs
    python -m experiments.agc_study plan --root=./workdirs/agc \
        --extra_flags="--config.data.data_dir=gs://my-bucket/tfds" > agc_commands.txt
    # 2. after (or while) they run: tables and the figure; one JSON summary line on stdout
    python -m experiments.agc_study collect --root=./workdirs/agc --out=./results/agc

`plan` covers, per depth (default 50 and 200) and batch size (256 … 4096), every λ of the
paper's grid {0.01, 0.02, 0.04, 0.08, 0.16} (configs/agc_ablation.py), the no-AGC NF-ResNet
(`clipping=0`) and the BN-ResNet baseline (configs/bn_resnet.py with `--config.train.batch_size`;
its LR scales with the batch as the NF runs' do), each for seeds 0 … `--seeds`−1. The default
plan is 2 depths × 5 batches × (5 λ + no AGC + BN) × 5 seeds = 350 runs of 90 ImageNet epochs.
Every point and every `--extra_flags` override is checked before anything is printed: each
command is parsed as experiments/train.py would parse it.

`collect` reads the final evaluation of every run in ROOT (plan.json, or the run folders it
finds), aggregates each point the paper's way (mean of the best 4 of 5 seeds; with n seeds, the
best n−1 when n ≥ 3, all when n ≤ 2; unfinished and missing runs are left out and listed) and
writes the study as JSON, a Markdown table and a PNG plot (`agc_study.*`) to `--out`
(nfnets_jax/analysis/agc_study.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from absl import flags as absl_flags

from nfnets_jax.analysis import agc_study
from nfnets_jax.train import config_files

from . import command_line

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NF_CONFIG = "configs/agc_ablation.py"
BN_CONFIG = "configs/bn_resnet.py"
PLAN_FILE = "plan.json"
BASELINES = ("no_agc", "bn")
# Set by the plan itself, so not accepted in --extra_flags.
PLANNED_FLAGS = ("--config", "--workdir", "--config.train.seed", "--config.train.batch_size",
                 "--config.optimizer.agc.clipping", "--config.model.name")
OUTPUT_NAMES = {kind: f"agc_study.{suffix}" for kind, suffix in (("json", "json"), ("markdown", "md"), ("png", "png"))}


def _load_config_module(relative_path: str) -> ModuleType:
    """A configs/*.py file as a module (the grid constants of configs/agc_ablation.py)."""
    return config_files.load_module(REPO_ROOT / relative_path)


# ---- plan ----------------------------------------------------------------------------------


def nf_config_arg(point: agc_study.StudyPoint) -> str:
    """The colon argument of configs/agc_ablation.py for `point` (its names: batch, clipping, depth)."""
    return (f"batch={point.batch},clipping={agc_study.format_clipping(point.clipping or 0.0)},"
            f"depth={point.depth}")


def run_argv(point: agc_study.StudyPoint, seed: int, workdir: str, extra_flags: Sequence[str]) -> list[str]:
    """The experiments/train.py flags of one run."""
    if point.model == "bn":
        flags = [f"--config={BN_CONFIG}:{point.depth}", f"--config.train.batch_size={point.batch}"]
    else:
        flags = [f"--config={NF_CONFIG}:{nf_config_arg(point)}"]
    return [*flags, f"--workdir={workdir}", f"--config.train.seed={seed}", *extra_flags]


def parse_train_flags(argv: Sequence[str]):
    """(config, workdir) exactly as experiments/train.py's --config/--workdir flags parse `argv`
    (a locked config, `--config.*` overrides applied); raises on any bad flag or value."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    # Config paths are relative to the repository root, where the commands run.
    full_argv = ["experiments/train.py", *(
        f"--config={REPO_ROOT / flag.split('=', 1)[1]}" if flag.startswith("--config=") else flag
        for flag in argv)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=True,
                                    sys_argv=full_argv)  # overrides are read from here, not sys.argv
    flags.DEFINE_string("workdir", None, "workdir", flag_values=values)
    with warnings.catch_warnings():  # ml_collections loads config files with load_module()
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        values(full_argv)
        return values.config, values.workdir


def _train_flag_names() -> set[str]:
    """The flags experiments/train.py defines besides --config/--workdir (multi-host etc.)."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    from . import train  # pylint: disable=import-outside-toplevel,unused-import  (also when installed)

    return set(flags.FLAGS) - {"config", "workdir"}


def _check_extra_flags(extra: Sequence[str]) -> None:
    other_flags = None
    for flag in extra:
        name = flag.split("=", 1)[0]
        if not flag.startswith("--"):
            raise ValueError(f"--extra_flags: {flag!r} is not a --flag; quote the whole list once, "
                             "e.g. --extra_flags='--config.data.data_dir=/data --config.eval.every_steps=0'")
        if name in PLANNED_FLAGS:
            raise ValueError(f"--extra_flags: {name} is set by the plan for each run; use --depths, "
                             "--batches, --clippings, --seeds or --root instead.")
        if not name.startswith("--config."):
            other_flags = _train_flag_names() if other_flags is None else other_flags
            bare = name[2:]
            if bare not in other_flags and not (bare.startswith("no") and bare[2:] in other_flags):
                raise ValueError(f"--extra_flags: experiments/train.py has no flag {name}.")


def _total_steps(config, cache: dict[str, Any]) -> int | None:
    """The run's step count when its dataset is readable here (None otherwise, e.g. ImageNet
    not prepared on the planning machine): `collect` then checks for the final eval without it."""
    key = config.data.to_json_best_effort()
    if key not in cache:
        try:
            from nfnets_jax import data  # pylint: disable=import-outside-toplevel

            cache[key] = data.dataset_info(config.data).num_train_examples
        except Exception:  # pylint: disable=broad-except  # the dataset is not readable here
            cache[key] = None
    if cache[key] is None:
        return None
    from nfnets_jax.train import config_schema  # pylint: disable=import-outside-toplevel

    return config_schema.total_train_steps(config, cache[key])


def make_plan(root: str, *, depths: Sequence[int], batches: Sequence[int], clippings: Sequence[float],
              seeds: int, baselines: Sequence[str], extra_flags: Sequence[str]) -> dict[str, Any]:
    """Every run of the study, each checked by parsing its command as experiments/train.py
    would; raises ValueError saying what to change."""
    if seeds < 1:
        raise ValueError(f"--seeds={seeds}: need at least 1 (the paper ran 5).")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"--baselines: unknown {unknown}; choose from {list(BASELINES)} (or '').")
    if not depths or not batches:
        raise ValueError("--depths and --batches need at least one value each.")
    _check_extra_flags(extra_flags)
    nf_module = _load_config_module(NF_CONFIG)
    lambdas = sorted({float(c) for c in clippings if float(c)})
    if "no_agc" in baselines or any(float(c) == 0.0 for c in clippings):
        lambdas.append(0.0)
    points = [agc_study.StudyPoint("nf", d, b, c) for d in depths for c in lambdas for b in batches]
    if "bn" in baselines:
        points += [agc_study.StudyPoint("bn", d, b, None) for d in depths for b in batches]
    # The grid at the door, with the config files' own messages (their argument names and ranges).
    for point in points:
        if point.model == "nf":
            nf_module.get_config(nf_config_arg(point))
    if "bn" in baselines:
        bn_module = _load_config_module(BN_CONFIG)
        for depth in depths:
            bn_module.get_config(str(depth))
    runs, steps_cache = [], {}
    for point in points:
        for seed in range(seeds):
            name = agc_study.run_name(point, seed)
            argv = run_argv(point, seed, os.path.join(root, name), extra_flags)
            try:
                # The other train.py flags (multi-host) were checked by name above.
                config, _ = parse_train_flags([f for f in argv if f.startswith(("--config", "--workdir"))])
            except Exception as error:  # absl/config_flags errors: name the run and the flag
                raise ValueError(f"run {name}: {' '.join(argv)}\n  does not parse: {error}") from error
            want = {"train.batch_size": point.batch, "train.seed": seed}
            got = {"train.batch_size": config.train.batch_size, "train.seed": config.train.seed}
            if got != want:  # an --extra_flags override fighting the plan
                raise ValueError(f"run {name}: the parsed config has {got}, the plan wants {want}.")
            runs.append({
                "name": name, "model": point.model, "depth": point.depth, "batch": point.batch,
                "clipping": point.clipping, "seed": seed, "workdir": os.path.join(root, name),
                "argv": argv, "total_steps": _total_steps(config, steps_cache),
                "command": " ".join(["python -m experiments.train", *map(shlex.quote, argv)]),
            })
    return {"root": root, "run_from": "the repository root", "seeds": seeds,
            "aggregation": agc_study.AGGREGATION_RULE,
            "runs": runs}


# ---- collect -------------------------------------------------------------------------------


def find_runs(root: str) -> list[tuple[str, agc_study.StudyPoint, int, int | None]]:
    """(workdir, point, seed, total steps) of every run: plan.json's (missing ones included),
    then any other run folder under `root`."""
    found: dict[str, tuple[str, agc_study.StudyPoint, int, int | None]] = {}
    plan_path = os.path.join(root, PLAN_FILE)
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            for run in json.load(f)["runs"]:
                parsed = agc_study.parse_run_name(run["name"])
                if parsed is not None:
                    found[run["name"]] = (os.path.join(root, run["name"]), *parsed, run.get("total_steps"))
    for name in sorted(os.listdir(root)):
        parsed = agc_study.parse_run_name(name)
        if parsed is not None and name not in found and os.path.isdir(os.path.join(root, name)):
            found[name] = (os.path.join(root, name), *parsed, None)
    return list(found.values())


def collect(root: str, out: str, metric: str = "top_1_acc") -> dict[str, Any]:
    """Reads, aggregates, writes the JSON/markdown tables and the PNG; returns the summary."""
    if not os.path.isdir(root):
        raise ValueError(f"--root={root} is not a directory; point it at the plan's --root.")
    runs = [agc_study.read_run(workdir, point, seed, total_steps)
            for workdir, point, seed, total_steps in find_runs(root)]
    if not runs:
        raise ValueError(f"no runs under {root}: expected {PLAN_FILE} or folders named like "
                         "d50_b1024_c0.04_s0 / bn_d50_b1024_s0 (python -m experiments.agc_study plan).")
    rows = agc_study.aggregate(runs)
    if not any(metric in row for row in rows):
        available = sorted({m for row in rows for m in agc_study.METRICS if m in row})
        if any(r.status == "finished" for r in runs):
            raise ValueError(f"--metric={metric}: no finished run logged it; available: {available}")
    os.makedirs(out, exist_ok=True)
    paths = {kind: os.path.join(out, name) for kind, name in OUTPUT_NAMES.items()}
    by_status = {s: sorted(r.name for r in runs if r.status == s) for s in ("finished", "unfinished", "missing")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"root": root, "metric": metric, "aggregation": agc_study.AGGREGATION_RULE,
                   "rows": rows,
                   "runs": [{"name": r.name, "status": r.status, "last_step": r.last_step,
                             "total_steps": r.total_steps, "note": r.note, **r.metrics} for r in runs]},
                  f, indent=1)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(agc_study.markdown_table(rows, metric))
    agc_study.plot_figure(rows, paths["png"], metric)
    best = {}
    for row in rows:
        if row["model"] == "nf" and row["clipping"] and metric in row:
            key = f"resnet{row['depth']}_b{row['batch']}"
            if key not in best or row[metric]["mean"] > best[key][1]:
                best[key] = (row["clipping"], row[metric]["mean"])
    return {**paths, "metric": metric, "runs": len(runs),
            **{s: len(names) for s, names in by_status.items()},
            "not_finished": {r.name: f"{r.status}" + (f" at step {r.last_step}" if r.last_step is not None else "")
                             for r in runs if r.status != "finished"},
            "best_clipping": {k: v[0] for k, v in sorted(best.items())}}


# ---- command line --------------------------------------------------------------------------


FLAGS = absl_flags.FlagValues()  # this program's own (command_line.parse_flags says why)
absl_flags.DEFINE_string("root", None, "plan: parent of the runs' workdirs; collect: the plan's --root.", flag_values=FLAGS)
absl_flags.DEFINE_list("depths", ["50", "200"], "plan: NF-/BN-ResNet depths (configs/agc_ablation.py: 50, 200).",
                       flag_values=FLAGS)
absl_flags.DEFINE_list("batches", None, "plan: batch sizes (default: the config's 256 … 4096).", flag_values=FLAGS)
absl_flags.DEFINE_list("clippings", None, "plan: λ values (default: the config's 0.01 … 0.16).", flag_values=FLAGS)
absl_flags.DEFINE_integer("seeds", 5, "plan: seeds 0 … N−1 per point (paper: 5).", lower_bound=1, flag_values=FLAGS)
absl_flags.DEFINE_list("baselines", list(BASELINES), "plan: 'no_agc' (clipping=0) and/or 'bn' "
                       "(configs/bn_resnet.py); empty for none.", flag_values=FLAGS)
absl_flags.DEFINE_string("extra_flags", "", "plan: flags appended to every command, one quoted string.",
                         flag_values=FLAGS)
absl_flags.DEFINE_string("out", None, "collect: directory for agc_study.{json,md,png} (created).", flag_values=FLAGS)
absl_flags.DEFINE_enum("metric", "top_1_acc", list(agc_study.METRICS),
                       "collect: what the figure and markdown show (the JSON has both when logged).", flag_values=FLAGS)
COMMANDS = ("plan", "collect")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`plan` or `collect` (the first argument), with this program's flags."""
    rest = command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                                    multihost=False)[1:]
    if len(rest) != 1 or rest[0] not in COMMANDS:
        command_line.fail(f"say what to do: one of {COMMANDS} (got {rest or 'nothing'}), e.g. "
                          "python -m experiments.agc_study plan --root=./workdirs/agc")
    command, args = rest[0], FLAGS
    needed = ("root",) if command == "plan" else ("root", "out")
    missing = [f"--{name}" for name in needed if not args[name].value]
    if missing:
        command_line.fail(f"{command} needs {', '.join(missing)}.")
    try:
        if command == "plan":
            nf_module = _load_config_module(NF_CONFIG)
            result = make_plan(
                args.root, depths=[int(d) for d in args.depths],
                batches=[int(b) for b in args.batches] if args.batches else list(nf_module.BATCH_SIZES),
                clippings=[float(c) for c in args.clippings] if args.clippings else list(nf_module.CLIPPINGS),
                seeds=args.seeds, baselines=[b for b in args.baselines if b],
                extra_flags=shlex.split(args.extra_flags))
            os.makedirs(args.root, exist_ok=True)
            plan_path = os.path.join(args.root, PLAN_FILE)
            with open(plan_path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
            for run in result["runs"]:
                print(run["command"])
            print(f"{len(result['runs'])} runs; plan written to {plan_path}. Run the commands from the "
                  "repository root, then: python -m experiments.agc_study collect "
                  f"--root={args.root} --out=DIR", file=sys.stderr)
            return result
        summary = collect(args.root, args.out, args.metric)
    except ValueError as error:
        command_line.fail(error)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
