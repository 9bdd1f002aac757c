"""Trains a model from a config file.

    python -m experiments.train --config=configs/<file>.py[:arg] --workdir=DIR [--config.a.b=value]

With no flags it trains the offline demo: configs/digits.py (a tiny NFNet on scikit-learn's
digits, CPU, a few minutes) in ./workdirs/digits. Re-running with the same workdir resumes from
its latest checkpoint. Multi-host: pass --coordinator_address/--num_processes/--process_id, or
--distributed on a TPU pod (SLURM jobs are detected from the environment); the flags are shared
with experiments.eval (experiments/command_line.py).

Read top to bottom: flags (the config loaded and checked) -> distributed start-up -> the builder
(nfnets_jax/train/builder.py: the config validated once, then input, model, optimizer, step and
run settings) and the door checks of the workdir -> the loop (nfnets_jax/train/loop.py: init or
resume, steps with periodic actions, finish) -> summary. The config is read by the builder only.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from nfnets_jax.runtime import program_output, stop_signals  # pylint: disable=wrong-import-position
from nfnets_jax.train import config_files  # pylint: disable=wrong-import-position  (no jax)

from . import command_line  # pylint: disable=wrong-import-position  # multi-host flags

DEFAULT_CONFIG = config_files.configs_folder() / "digits.py"

# No default here: ml_collections would apply the command line's overrides to it at import, where
# a misspelt one is a traceback; parse_flags puts DEFAULT_CONFIG in when --config is absent.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Experiment config file, optionally with ':arg' (a variant; default: "
    f"configs/{DEFAULT_CONFIG.name}).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics and plots go here (default: ./workdirs/<config>).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        command_line.fail(f"unexpected arguments {argv[1:]}; settings go in --config.* flags.")
    program_output.for_program()  # again: app.run resets absl's logging after parsing the flags
    stop_signals.leave_at_once("before training started; nothing was written")  # the loop takes over
    from nfnets_jax.train import config_schema  # pylint: disable=import-outside-toplevel  (no jax)

    config = _CONFIG.value  # loaded (and checked) by command_line.parse_flags
    config_spec = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or config_schema.default_workdir(config_spec)
    try:
        command_line.check_workdir_writable(workdir)
    except command_line.UserError as error:
        command_line.fail(error)

    # ---- Processes and devices (before anything touches a device) ----
    command_line.initialize_processes(command_line.restart_hint(
        f"training resumes exactly from the last checkpoint in {workdir}"))
    # pylint: disable=import-outside-toplevel
    import jax

    from nfnets_jax import weights
    from nfnets_jax.data import DatasetUnavailableError
    from nfnets_jax.train import builder, checkpointing, loop
    from nfnets_jax.runtime import distributed, workdir_lock

    is_main = jax.process_index() == 0
    if is_main:
        print(f"Config: {config_spec}"
              f"{' (default)' if config_spec == str(DEFAULT_CONFIG) else ''}; workdir: {workdir}"
              f"{'' if _WORKDIR.value else ' (default)'}; {jax.process_count()} process(es), "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)

    # ---- Checks at the door, before anything is written: config, model, weights, workdir ----
    try:
        experiment = builder.build_experiment(config)  # validates the config (once)
        try:  # the model builds with these kwargs (shapes only, nothing computed)
            abstract_state = jax.eval_shape(loop.initializer(experiment))
        except (ValueError, TypeError, IndexError, KeyError) as error:
            raise ValueError(f"config.model ({config.model.name} with kwargs "
                             f"{config.model.kwargs.to_dict()}) does not build: {error}") from error
        checkpointing.check_resumable(workdir, abstract_state)
    except (ValueError, OSError, DatasetUnavailableError, weights.UnsafeCheckpointError,
            checkpointing.CorruptCheckpointError, checkpointing.CheckpointDirectoryError,
            MemoryError) as error:
        command_line.fail(error)
    # (config.json is written by the loop, once it holds the workdir lock and the checks passed.)

    # ---- Train (resumes from the workdir's latest checkpoint), evaluate, plot ----
    try:
        summary = loop.run(experiment, workdir)
    except (loop.NonFiniteError, checkpointing.CorruptCheckpointError,
            checkpointing.IncompatibleCheckpointError, checkpointing.CheckpointDirectoryError,
            checkpointing.CheckpointSaveError, workdir_lock.WorkdirLockError) as error:
        command_line.fail(error)
    except Exception as error:  # pylint: disable=broad-except
        if jax.process_count() > 1:  # most likely a peer died: say so, skip the shutdown barrier
            distributed.leave_after_failure(error, workdir)
        raise

    if is_main:
        results = summary.eval_metrics
        if summary.stopped_by == "preempted":
            print(f"Stopped by {stop_signals.signal_name(summary.stop_signal)} at step {summary.step}; "
                  "run the same command to resume.")
        else:
            accuracy = results.get("ema_top_1_acc", results.get("top_1_acc"))
            which = "EMA" if "ema_top_1_acc" in results else "raw"
            print(f"Done: {summary.step} steps. Test top-1 ({which} params): {100 * accuracy:.2f}% "
                  f"(raw {100 * results['top_1_acc']:.2f}%) on {int(results['num_examples'])} examples.")
        print(f"Checkpoints: {summary.checkpoint_dir}")
        logdir = workdir if "://" in workdir else os.path.abspath(workdir)
        print(f"Metrics: {summary.metrics_file}  (TensorBoard: tensorboard --logdir {logdir})")
        if summary.plot_file:
            print(f"Training curves: {summary.plot_file}")
    distributed.shutdown()
    if summary.stopped_by == "preempted":
        # Everything is on disk. Exit now: the input pipeline's threads may be in the middle of
        # a slow batch, and tearing them down can take longer than the preemption notice.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop_signals.exit_status(summary.stop_signal, saved=True))  # pylint: disable=protected-access


def parse_flags(argv: list[str]) -> list[str]:
    """This command's flags and config, every mistake as one line (command_line.parse_flags)."""
    return command_line.parse_flags(argv, lambda: _CONFIG.value, default_config=str(DEFAULT_CONFIG))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
