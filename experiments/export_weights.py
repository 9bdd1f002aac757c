"""Exports a finished run's EMA params as a shipped pretrained model: `<name>.npz` and its card.

    python -m experiments.export_weights --workdir=/work/runs/fashion_mnist_ref --name=nfnet_fashion_mnist

Reads the newest intact checkpoint of `--workdir` (verified as on resume; a run that has not
reached its last step is refused) and the run's own
config.json and provenance.json, evaluates the EMA params on the config's eval split (the
number the card states is measured on exactly the exported file's params), then writes into
`--out_dir` (default: the package's `nfnets_jax/weights/files/`, which setup.py ships):

- `<name>.npz`: the EMA params in our pickle-free format (`weights.save_npz`);
- `<name>.json`: the card `weights.load_pretrained(name)` reads (`weights.pretrained`): the file's
  SHA-256, model and kwargs, input size and normalisation, classes, test top-1, commands.

Both are written atomically, the card last. Prints the SHA-256 and top-1 for docs/weights.md.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import flags

from . import command_line, run_record

FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_string("workdir", None, "A finished training run's workdir.", flag_values=FLAGS)
flags.DEFINE_string("name", "nfnet_fashion_mnist", "Name of the pretrained model (the files' stem).",
                    flag_values=FLAGS)
flags.DEFINE_string("out_dir", None, "Where to write NAME.npz and NAME.json (default: the package's "
                    "nfnets_jax/weights/files).", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir"], flag_values=FLAGS)


def class_names(data_name: str, num_classes: int) -> tuple[str, ...]:
    """The classes' names where the data set has them (Fashion-MNIST's), else '0', '1', ..."""
    from nfnets_jax.data import fashion_mnist  # pylint: disable=import-outside-toplevel  (TFDS)

    if data_name == fashion_mnist.NAME:
        return fashion_mnist.CLASS_NAMES
    return tuple(str(label) for label in range(num_classes))


def read_run(workdir: str) -> tuple[dict, dict]:
    """(config, provenance) as the run wrote them; ValueError if the workdir is not a run's."""
    found = []
    for name in ("config.json", "provenance.json"):
        path = os.path.join(workdir, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: --workdir must be the workdir of an "
                             "experiments.train run")
        with open(path, encoding="utf-8") as file:
            found.append(json.load(file))
    return found[0], found[1]


def export(workdir: str, name: str, out_dir: str) -> "weights.PretrainedModel":  # noqa: F821
    """Evaluates and writes the model (module docstring); returns its card."""
    # pylint: disable=import-outside-toplevel
    import ml_collections

    from nfnets_jax import weights
    from nfnets_jax.data.sources import make_source
    from nfnets_jax.models import abstract_init
    from nfnets_jax.train import builder, checkpointing, config_schema, evaluation, parallel
    from nfnets_jax.train.step import make_eval_step
    from nfnets_jax.weights.atomic_write import replaced_atomically

    config_dict, run_provenance = read_run(workdir)
    if not name.isidentifier():
        raise ValueError(f"--name={name!r}: use letters, digits and underscores (it names the files)")
    saved = checkpointing.read_workdir_state(workdir)
    if saved["ema_params"] is None:
        raise ValueError(f"{workdir}: the run kept no EMA params (config.optimizer.ema_decay unset)")
    if saved["model_state"]:
        raise ValueError(f"{workdir}: the model has state (e.g. BatchNorm statistics); only "
                         "state-free models (NFNets) are exported as a params file")
    config = ml_collections.ConfigDict(config_dict)
    parts = builder.build_evaluation(config)
    source = make_source(config.data)  # the normalisation and classes, for the card
    planned = config_schema.total_train_steps(config, source.split_size(config.data.train_split))
    if saved["step"] < planned:
        raise ValueError(f"{workdir}: the run stopped at step {saved['step']} of {planned}; resume it "
                         "(its own command) and export when it has finished")
    weights.check_params_match(saved["ema_params"], abstract_init(parts.forward, parts.image_size)[0])
    backend = parallel.make_backend(parts.backend)
    eval_fn = backend.wrap_eval(make_eval_step(parts.forward))
    metrics = evaluation.evaluate_trees(
        eval_fn, {"ema": (backend.replicate(saved["ema_params"]), backend.replicate({}))},
        parts.eval_batches(), backend.put_batch)["ema"]

    npz_path = os.path.join(out_dir, f"{name}.npz")
    weights.save_npz(npz_path, saved["ema_params"])
    data_config = config.data
    card = weights.PretrainedModel(
        name=name, file=f"{name}.npz", sha256=weights.sha256_of_file(npz_path),
        model_name=config.model.name, model_kwargs=config_dict["model"]["kwargs"],
        num_classes=source.num_classes, class_names=class_names(data_config.name, source.num_classes),
        image_size=int(data_config.eval_image_size), mean_rgb=tuple(source.mean_rgb),
        stddev_rgb=tuple(source.stddev_rgb),
        preprocessing=(f"{data_config.name}:{data_config.eval_split} images as the config's eval "
                       f"pipeline serves them (eval_preprocess={data_config.eval_preprocess!r} to "
                       f"{data_config.eval_image_size} px, grey replicated to RGB, then "
                       "(x - mean_rgb) / stddev_rgb)"),
        dataset=data_config.name, config=_config_name(run_provenance),
        train_steps=saved["step"], test_top_1=round(float(metrics["top_1_acc"]), 4),
        test_examples=int(metrics["num_examples"]),
        command=(f"{run_record.training_command(run_provenance)} "
                 f"(commit {run_provenance['git']['commit'][:12]}); "
                 f"python -m experiments.export_weights --workdir={workdir} --name={name}"))
    with replaced_atomically(os.path.join(out_dir, f"{name}.json")) as file:
        file.write(card.to_json().encode("utf-8"))
    return card


def _config_name(run_provenance: dict) -> str:
    """`fashion_mnist` from the run's `--config=configs/fashion_mnist.py` (the name
    `config_files.load_config` takes); the argument as given if it is not one of the project's."""
    for arg in run_provenance["argv"][1:]:
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
            stem = os.path.basename(spec.partition(":")[0])
            return stem[:-3] if stem.endswith(".py") else spec
    return "digits"  # experiments.train's default config


def main(argv: Sequence[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False)
    from nfnets_jax import data, weights  # pylint: disable=import-outside-toplevel

    out_dir = FLAGS.out_dir or str(weights.pretrained.FILES_DIR)
    try:
        card = export(FLAGS.workdir, FLAGS.name, out_dir)
    except (ValueError, OSError, data.DatasetUnavailableError) as error:
        command_line.fail(error)
    print(f"{out_dir}/{card.file}: {os.path.getsize(os.path.join(out_dir, card.file)) / 2**20:.2f} MiB, "
          f"sha256 {card.sha256}, test top-1 {100 * card.test_top_1:.2f}% "
          f"({card.test_examples} {card.dataset} test images, step {card.train_steps})")


if __name__ == "__main__":
    main()
