"""Evaluates trained weights: top-1, top-5 and loss on the config's eval split.

    python -m experiments.eval                                     # the digits demo's workdir
    python -m experiments.eval --config=configs/nfnet.py:F0 --workdir=DIR
    python -m experiments.eval --weights=F0_haiku.npz --variant=F0 [--data_dir=TFDS_DIR] [--batch_size=N]

From a workdir it evaluates the latest checkpoint's raw and EMA params; from a weight file
(DeepMind's `F*_haiku.npz` read without unpickling code, timm's `.safetensors`, our `.npz`) it evaluates
that one tree. `--variant=F0` means `--config=configs/nfnet.py:F0`: ImageNet's validation split
at the variant's test resolution (256 px for F0, resize to S+32 squashed then centre crop).
Parameter names and shapes are checked against the model before anything runs.

On a pod, run it on every host with the same multi-host flags as training (`--distributed`, or
`--coordinator_address/--num_processes/--process_id`, experiments/command_line.py): each process
reads its own slice of the eval split and the one result, over all of them, is printed once.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from nfnets_jax.runtime import program_output, stop_signals  # pylint: disable=wrong-import-position

from nfnets_jax.train import config_files  # pylint: disable=wrong-import-position  (no jax)

from . import command_line  # pylint: disable=wrong-import-position  # multi-host flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:arg] (default: configs/digits.py, or the --variant's).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir to evaluate (its latest checkpoint).")
_WEIGHTS = flags.DEFINE_string("weights", None, "A weight file: DeepMind's F*_haiku.npz, timm's .safetensors or our .npz.")
_VARIANT = flags.DEFINE_string("variant", None, "NFNet variant of --weights (F0 ... F6): picks configs/nfnet.py:<variant>.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (overrides config.data.data_dir).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Global eval batch, a multiple of the device count (overrides config.eval.batch_size).")


def _checked_config():
    """`resolve_config()` with a wrong --variant or --config/--variant pair as a UserError."""
    try:
        return resolve_config()
    except (ValueError, app.UsageError) as error:
        raise command_line.UserError(str(error)) from error


def resolve_config():
    """--config if given, else configs/nfnet.py:<variant> for --variant, else the digits demo."""
    if _VARIANT.value and _CONFIG.value is not None:
        raise ValueError("Pass --variant or --config, not both (--variant=F0 means "
                             "--config=configs/nfnet.py:F0).")
    if _CONFIG.value is not None:
        config = _CONFIG.value
        name = str(config_flags.get_config_filename(flags.FLAGS["config"]))
    elif _VARIANT.value:
        config = config_files.load_config(f"nfnet:{_VARIANT.value}")
        name = f"configs/nfnet.py:{_VARIANT.value}"
    else:
        config = config_files.load_config("digits")
        name = "configs/digits.py"
    if _DATA_DIR.value or _BATCH_SIZE.value:
        config.unlock()
        if _DATA_DIR.value:
            config.data.data_dir = _DATA_DIR.value
        if _BATCH_SIZE.value:
            config.eval.batch_size = _BATCH_SIZE.value
        config.lock()
    return config, name


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        command_line.fail(f"unexpected arguments {argv[1:]}.")
    program_output.for_program()  # again: app.run resets absl's logging after parsing the flags
    stop_signals.leave_at_once("evaluation interrupted; nothing was written")
    # pylint: disable=import-outside-toplevel
    from nfnets_jax.train import config_schema

    try:
        config, config_name = _checked_config()
        if _WEIGHTS.value and _WORKDIR.value:
            raise command_line.UserError("Pass --weights or --workdir, not both.")
        source = _WEIGHTS.value or _WORKDIR.value or config_schema.default_workdir(config_name)
        if not _WEIGHTS.value and "://" not in source and not os.path.isdir(source):
            raise command_line.UserError(
                f"--workdir={source} is not a folder{'' if _WORKDIR.value else ' (the default for ' + config_name + ')'}: "
                "pass the workdir of a training run, or --weights=FILE.")
        if _WEIGHTS.value and not os.path.isfile(source):
            raise command_line.UserError(f"--weights={source}: no such file.")
    except command_line.UserError as error:
        command_line.fail(error)

    command_line.initialize_processes(command_line.restart_hint())
    import jax
    import jax.numpy as jnp

    from nfnets_jax import data, weights
    from nfnets_jax.models import abstract_init
    from nfnets_jax.runtime import distributed
    from nfnets_jax.runtime import workdir as workdir_lib
    from nfnets_jax.train import builder, checkpointing, evaluation, parallel
    from nfnets_jax.train.step import make_eval_step

    is_main = jax.process_index() == 0

    # ---- Checks at the door: config, weights present and matching the model ----
    try:
        parts = builder.build_evaluation(config)  # validates the config (once)
        try:
            abstract_params, abstract_state = abstract_init(parts.forward, parts.image_size)
        except (ValueError, TypeError, IndexError, KeyError) as error:
            raise ValueError(f"config.model ({config.model.name} with kwargs "
                             f"{config.model.kwargs.to_dict()}) does not build: {error}") from error
        if _WEIGHTS.value:
            trees = {"": checkpointing.read_params(source)}
            model_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_state)
        else:
            saved = checkpointing.read_workdir_state(source)
            trees = {"": saved["params"]}
            if saved["ema_params"]:
                trees["ema_"] = saved["ema_params"]
            model_state = saved["model_state"]
        for tree in trees.values():
            weights.check_params_match(tree, abstract_params)
    except (ValueError, OSError, data.DatasetUnavailableError, weights.UnsafeCheckpointError,
            checkpointing.CorruptCheckpointError, MemoryError) as error:
        command_line.fail(error)

    # ---- Evaluate on every device, at the config's eval resolution ----
    backend = parallel.make_backend(parts.backend)
    eval_fn = backend.wrap_eval(make_eval_step(parts.forward))
    try:
        state = backend.replicate(model_state)
        by_tree = evaluation.evaluate_trees(  # one pass over the split serves every tree
            eval_fn, {prefix: (backend.replicate(params), state) for prefix, params in trees.items()},
            parts.eval_batches(), backend.put_batch)
    except Exception as error:  # pylint: disable=broad-except
        if jax.process_count() > 1:  # most likely a peer died: say so, skip the shutdown barrier
            distributed.leave_after_failure(error, source)
        raise
    results = {f"{prefix}{name}": value for prefix, metrics in by_tree.items()
               for name, value in metrics.items()}

    if is_main:
        print(f"{parts.model_name} from {source} on {parts.data_description} ({int(results['num_examples'])} "
              f"examples; config {config_name})")
        for prefix in trees:
            label = "EMA params" if prefix else "params"
            print(f"  {label:10s}  top-1 {100 * results[prefix + 'top_1_acc']:.2f}%  "
                  f"top-5 {100 * results[prefix + 'top_5_acc']:.2f}%  loss {results[prefix + 'loss']:.4f}")
        folder = workdir_lib.as_path(source)  # a local folder or a gs:// workdir
        if folder.is_dir():
            target = folder / "eval_results.json"
            try:
                workdir_lib.write_text_atomically(target, json.dumps(results, indent=2))
            except Exception as error:  # pylint: disable=broad-except  # read-only, full, no permission
                reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
                print(f"warning: the results above could not be saved to {target} ({reason}); "
                      "nothing else is affected.", file=sys.stderr)
    distributed.shutdown()


def parse_flags(argv: list[str]) -> list[str]:
    """This command's flags and config, every mistake as one line (command_line.parse_flags).
    No default config file here: it depends on --variant (resolve_config)."""
    return command_line.parse_flags(argv, lambda: _CONFIG.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
