"""The experiment runner: train state, per-device step, pmap/shard_map backends, checkpoints,
logging, evaluation and the loop that ties them together. `build_experiment` and `run` (module
`experiment`) are the entry points, for `experiments/train.py` and for notebooks alike.

Modules, in the order a step meets them: `config_schema` (the shared config and its checks),
`forward` (config.model -> the Haiku classifier), `state` (TrainState), `step` (the per-device
train and eval steps), `parallel` (pmap and shard_map backends), `evaluation`, `checkpointing`
(orbax, SIGTERM), `pretrained` (starting from trained weights), `metrics_logging` (progress,
TensorBoard, JSONL, plots), `loop` (the training loop), `distributed` (multi-host start-up) and
`fakes` (a fake model and data for the runner's tests), `experiment` (config -> experiment, and
`run` from Python).
"""

# The notebook entry points, loaded on first use (they import the data pipeline's TensorFlow).
_EXPERIMENT_API = ("build_experiment", "run", "config_optimizer", "learning_rate_schedule",
                   "schedule_args")


def __getattr__(name: str):
    if name in _EXPERIMENT_API:
        from nfnets_jax.train import experiment  # pylint: disable=import-outside-toplevel

        return getattr(experiment, name)
    raise AttributeError(f"module 'nfnets_jax.train' has no attribute {name!r}")
