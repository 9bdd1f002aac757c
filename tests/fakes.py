"""A fake classifier and in-memory data, to test the runner without a real network.

Scenic's trainer tests use a fake model with simple logits so that the loop, the step, the
checkpoints and the multi-device code are tested on their own. Here: a linear
classifier on the flattened image, with optional dropout (so the per-device RNG matters), and a
deterministic stream of Gaussian-blob images whose batch at step `s` depends only on `(seed, s)`,
so a resumed run sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import haiku as hk
import jax
import ml_collections
import numpy as np
import optax

from nfnets_jax import optim
from nfnets_jax.train import builder, config_schema
from nfnets_jax.train.loop import Experiment


def fake_forward(num_classes: int, drop_rate: float = 0.0) -> hk.TransformedWithState:
    """`(images, is_training) -> logits` of a linear classifier with optional dropout."""

    class FakeNet(hk.Module):
        """Parameter paths like the real models': `fake_net/~/linear/w`."""

        def __init__(self):
            super().__init__(name="fake_net")
            self.linear = hk.Linear(num_classes, name="linear")

        def __call__(self, images: jax.Array, is_training: bool) -> jax.Array:
            features = images.reshape(images.shape[0], -1)
            if is_training and drop_rate > 0:
                features = hk.dropout(hk.next_rng_key(), drop_rate, features)
            return self.linear(features)

    return hk.transform_with_state(lambda images, is_training: FakeNet()(images, is_training))


class FakeData:
    """Learnable in-memory images: class c is a fixed random pattern plus noise.

    Host batches follow the data contract (docs/CONTRACTS.md): `[local_devices, B, H, W, C]`
    images, `labels`, `mix_labels`, `ratio` (1: nothing mixed) and, for eval, `mask`. Each process
    takes its own rows of the global batch.
    """

    def __init__(self, *, num_classes: int = 4, image_shape: tuple[int, int, int] = (4, 4, 3),
                 num_eval_examples: int = 37, seed: int = 0, noise: float = 0.5):
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.num_eval_examples = num_eval_examples
        self.seed = seed
        self.noise = noise
        self.class_means = np.random.default_rng(seed).normal(size=(num_classes, *image_shape))

    def _examples(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, self.num_classes, size=n).astype(np.int32)
        images = self.class_means[labels] + self.noise * rng.normal(size=(n, *self.image_shape))
        return images.astype(np.float32), labels

    def _local_rows(self, array: np.ndarray, local_devices: int) -> np.ndarray:
        """This process's devices' rows of a global `[devices, B, ...]` array."""
        start = jax.process_index() * local_devices
        return array[start:start + local_devices]

    def train_batches(self, start_step: int, *, global_batch_size: int) -> Iterator[dict]:
        """The batch of step s is drawn from `default_rng([seed, s])`: resumable at any step."""
        devices, local_devices = jax.device_count(), jax.local_device_count()
        per_device = global_batch_size // devices
        step = start_step
        while True:
            images, labels = self._examples(np.random.default_rng([self.seed, step]), global_batch_size)
            shape = (devices, per_device)
            yield {
                "images": self._local_rows(images.reshape(*shape, *self.image_shape), local_devices),
                "labels": self._local_rows(labels.reshape(shape), local_devices),
                "mix_labels": self._local_rows(labels.reshape(shape), local_devices),
                "ratio": np.ones((local_devices, per_device), np.float32),
            }
            step += 1

    def eval_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole eval set (fixed), for computing expected numbers independently."""
        return self._examples(np.random.default_rng([self.seed, 0, 1]), self.num_eval_examples)

    def eval_batches(self, *, global_batch_size: int) -> Iterator[dict]:
        """One pass over the eval set; the last batch is zero-padded with `mask == 0`."""
        devices, local_devices = jax.device_count(), jax.local_device_count()
        per_device = global_batch_size // devices
        images, labels = self.eval_arrays()
        for start in range(0, len(labels), global_batch_size):
            chunk_images = images[start:start + global_batch_size]
            chunk_labels = labels[start:start + global_batch_size]
            real = len(chunk_labels)
            pad = global_batch_size - real
            mask = np.concatenate([np.ones(real, np.float32), np.zeros(pad, np.float32)])
            chunk_images = np.concatenate([chunk_images, np.zeros((pad, *self.image_shape), np.float32)])
            chunk_labels = np.concatenate([chunk_labels, np.zeros(pad, np.int32)])
            shape = (devices, per_device)
            yield {
                "images": self._local_rows(chunk_images.reshape(*shape, *self.image_shape), local_devices),
                "labels": self._local_rows(chunk_labels.reshape(shape), local_devices),
                "mask": self._local_rows(mask.reshape(shape), local_devices),
            }


def fake_config(**overrides) -> ml_collections.ConfigDict:
    """A tiny run of the shared schema: f32, 8 examples per step, AGC on, frequent checkpoints,
    nothing mixed (FakeData's batches hold one label each).

    `overrides` are dotted paths, e.g. `fake_config(**{"train.steps": 5})`.
    """
    config = config_schema.base_config()
    config.train.batch_size = 8
    config.train.steps = 6
    config.optimizer.lr = 0.1
    config.optimizer.lr_scale_by_batch = False
    config.optimizer.warmup_epochs = 0.0
    config.optimizer.ema_decay = 0.99
    config.precision.compute_dtype = "float32"
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 2
    config.eval.every_steps = 0
    config.eval.batch_size = 8
    config.log.every_steps = 1
    config.data.augment.mix = "none"  # FakeData mixes nothing (ratio 1)
    config.update_from_flattened_dict(overrides)
    return config


STEPS_PER_EPOCH = 10  # a fake data set of 10 batches, for the schedule's epochs


def fake_experiment(config: ml_collections.ConfigDict, data: FakeData, *, drop_rate: float = 0.0,
                    optimizer: optax.GradientTransformation | None = None) -> Experiment:
    """The loop's inputs for a fake model on `data`, built from `config` by the runner's own
    builder (`builder.build_parts`), with the fake model and data in place of the config's.

    `optimizer` replaces the config's (AGC -> weight decay -> SGD, in `with_sam` when
    `optimizer.sam.rho` is set), as `build_experiment(config, optimizer=...)` does.
    """
    parts = builder.build_parts(config, num_classes=data.num_classes,
                                num_train_examples=STEPS_PER_EPOCH * config.train.batch_size,
                                image_shape=data.image_shape, optimizer=optimizer,
                                forward=fake_forward(data.num_classes, drop_rate),
                                agc_groups={"head": r"^fake_net/~/linear/"})
    return Experiment(
        forward=parts.forward, optimizer=parts.optimizer, step_settings=parts.step_settings,
        run_settings=parts.run_settings,
        train_batches=lambda start: data.train_batches(start, global_batch_size=config.train.batch_size),
        eval_batches=lambda: data.eval_batches(global_batch_size=config.eval.batch_size),
        describe_param_groups=lambda params: optim.describe_param_groups(parts.optimizer_config, params),
    )


def fake_schedule_args(config: ml_collections.ConfigDict) -> dict:
    """What `make_optimizer` takes for a fake run (`builder.schedule_args` of the fake data set)."""
    return builder.schedule_args(config, STEPS_PER_EPOCH * config.train.batch_size)
