"""The runner: a config becomes an experiment (`builder`), and the loop trains it (`loop`).

    experiment = nfnets_jax.train.build_experiment(config)      # or build_experiment(config, optimizer=...)
    summary = nfnets_jax.train.run(experiment, workdir, num_steps=200)
    steps, losses = summary.series("loss")

`experiments/train.py` does exactly this, so what a notebook tries is what the command line and a
pod run. docs/architecture.md maps the modules.
"""

# The entry points, loaded on first use (the builder imports the data pipeline's TensorFlow).
_BUILDER_API = ("build_experiment", "build_parts", "config_optimizer", "learning_rate_schedule",
                "schedule_args")


def __getattr__(name: str):
    if name in _BUILDER_API:
        from nfnets_jax.train import builder  # pylint: disable=import-outside-toplevel

        return getattr(builder, name)
    if name == "run":
        from nfnets_jax.train import loop  # pylint: disable=import-outside-toplevel

        return loop.run
    raise AttributeError(f"module 'nfnets_jax.train' has no attribute {name!r}")
