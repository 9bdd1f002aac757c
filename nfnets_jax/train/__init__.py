"""The experiment runner: train state, per-device step, pmap/shard_map backends, checkpoints,
logging, evaluation and the loop that ties them together (`experiments/train.py` drives it).

Modules, in the order a step meets them: `config_schema` (the shared config and its checks),
`forward` (config.model -> the Haiku classifier), `state` (TrainState), `step` (the per-device
train and eval steps), `parallel` (pmap and shard_map backends), `evaluation`, `checkpointing`
(orbax, SIGTERM), `pretrained` (starting from trained weights), `metrics_logging` (progress,
TensorBoard, JSONL, plots), `loop` (the training loop), `distributed` (multi-host start-up) and
`fakes` (a fake model and data for the runner's tests).
"""
