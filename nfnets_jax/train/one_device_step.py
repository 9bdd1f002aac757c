"""The runner's real train step for one config on ONE device, without the loop or any data.

Benchmarks (`benchmarks.compare_timm`, `benchmarks.train_step_throughput`) and the memory plan
(`experiments.memory_plan`) need exactly what `experiments.train` compiles — the model of
`config.model`, `make_train_step` with AGC → weight decay → SGD from `config.optimizer`, label
smoothing, compute dtype, EMA — but for one device's batch, and for the memory plan from shapes
only. The config is built by the runner's own builder (`builder.build_parts`) and the step is
wrapped by the runner's shard_map backend over a one-device mesh (`parallel`), so none of them
re-implements either: the per-device function is the one every multi-device run executes (its
`pmean`s are then identities), and its memory is the memory of one device of a data-parallel run
at the same per-device batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfnets_jax.models import standardized_inference
from nfnets_jax.train import builder, loop, parallel
from nfnets_jax.train import step as step_lib
from nfnets_jax.train.state import TrainState

# The optimizer schedule needs a data set size; its value does not change the step's cost.
_NOMINAL_TRAIN_EXAMPLES = 1_281_167  # ImageNet's


@dataclasses.dataclass(frozen=True)
class OneDeviceStep:
    """The compiled-on-demand train and eval functions of one config, and how to make inputs.

    Attributes:
      train: jitted `(state, batch) -> (state, metrics)`; the state is donated, as in the runner.
      evaluate: jitted `(params, model_state, images) -> logits`, inference (`is_training=False`)
        in the compute dtype.
      standardized_kernels: jitted `(params, model_state) -> kernels`, every weight-standardised
        kernel of `params` in the compute dtype, for `evaluate_with_kernels`
        (`nfnets_jax.models.standardized_inference`).
      evaluate_with_kernels: jitted `(params, model_state, kernels, images) -> logits`: `evaluate`
        with the kernels standardised once instead of on every call.
      init_state: `() -> TrainState` (pure; jit it, or `jax.eval_shape` it for shapes only).
      batch_shapes: the batch as `jax.ShapeDtypeStruct`s (per-device batch × image size).
      forward: the Haiku forward the step uses.
      num_classes: classes of the model's head.
      optimizer: the optax chain the step applies (AGC -> weight decay -> SGD, maybe inside SAM).
      settings: the step's settings (compute dtype, label smoothing, EMA decay, ...).
      backend: the runner's shard_map backend over the one-device mesh `train` is compiled for
        (its device: `device` of `build`); `backend.wrap_train` wraps other steps the same way.
    """

    train: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[hk.Params, hk.State, jax.Array], jax.Array]
    standardized_kernels: Callable[[hk.Params, hk.State], dict[str, jax.Array]]
    evaluate_with_kernels: Callable[[hk.Params, hk.State, dict[str, jax.Array], jax.Array], jax.Array]
    init_state: Callable[[], TrainState]
    batch_shapes: dict[str, jax.ShapeDtypeStruct]
    forward: hk.TransformedWithState
    num_classes: int
    optimizer: optax.GradientTransformation
    settings: step_lib.StepSettings
    backend: parallel.Backend

    def abstract_state(self) -> TrainState:
        """The state's shapes and dtypes; nothing is computed or allocated."""
        return jax.eval_shape(self.init_state)

    def random_batch(self, seed: int = 0) -> dict[str, jax.Array]:
        """A batch of the right shapes: Gaussian images, random labels, no mixing (ratio 1)."""
        images, labels = (self.batch_shapes[k] for k in ("images", "labels"))
        num_classes = self.num_classes
        keys = jax.random.split(jax.random.PRNGKey(seed), 2)
        labels = jax.random.randint(keys[1], labels.shape, 0, num_classes)
        return {
            "images": jax.random.normal(keys[0], images.shape, images.dtype),
            "labels": labels,
            "mix_labels": labels,
            "ratio": jnp.ones(labels.shape, jnp.float32),
        }


def build(config: ml_collections.ConfigDict, per_device_batch: int, *, num_classes: int = 1000,
          image_size: int | None = None, device: jax.Device | None = None) -> OneDeviceStep:
    """The train/eval step of `config` for `per_device_batch` images on `device` (default: the first).

    Reads `config.model` (name, kwargs), `config.train.remat` when present, `config.optimizer`,
    `config.loss.label_smoothing`, `config.precision.compute_dtype`, `config.data.image_size`
    (unless `image_size` is given) and `config.train.seed`.
    """
    if per_device_batch < 1:
        raise ValueError(f"per_device_batch must be >= 1, got {per_device_batch}.")
    size = image_size or config.data.image_size
    parts = builder.build_parts(config, num_classes=num_classes, num_train_examples=_NOMINAL_TRAIN_EXAMPLES,
                                image_shape=(size, size, 3), device_count=1)
    forward, settings = parts.forward, parts.step_settings
    backend = parallel.make_shard_map_backend(devices=[device or jax.devices()[0]])
    train = backend.wrap_train(step_lib.make_train_step(forward, parts.optimizer, settings))
    compute_dtype = settings.compute_dtype

    def evaluate(params: hk.Params, model_state: hk.State, images: jax.Array) -> jax.Array:
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        return forward.apply(params, model_state, None, images.astype(compute_dtype), is_training=False)[0]

    kernels_of = standardized_inference.standardized_kernels_fn(forward)

    def standardized_kernels(params: hk.Params, model_state: hk.State) -> dict[str, jax.Array]:
        return kernels_of(jax.tree.map(lambda p: p.astype(compute_dtype), params), model_state)

    def evaluate_with_kernels(params: hk.Params, model_state: hk.State, kernels: dict[str, jax.Array],
                              images: jax.Array) -> jax.Array:
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        return standardized_inference.apply_with_kernels(
            forward, params, model_state, kernels, images.astype(compute_dtype))[0]

    experiment = loop.Experiment(forward=forward, optimizer=parts.optimizer, step_settings=settings,
                                 run_settings=parts.run_settings, train_batches=None, eval_batches=None)
    init_state = loop.initializer(experiment)

    batch_shapes = {
        "images": jax.ShapeDtypeStruct((per_device_batch, size, size, 3), jnp.float32),
        "labels": jax.ShapeDtypeStruct((per_device_batch,), jnp.int32),
        "mix_labels": jax.ShapeDtypeStruct((per_device_batch,), jnp.int32),
        "ratio": jax.ShapeDtypeStruct((per_device_batch,), jnp.float32),
    }
    return OneDeviceStep(train=train, evaluate=jax.jit(evaluate), standardized_kernels=jax.jit(standardized_kernels),
                         evaluate_with_kernels=jax.jit(evaluate_with_kernels), init_state=init_state,
                         batch_shapes=batch_shapes, forward=forward, num_classes=num_classes,
                         optimizer=parts.optimizer, settings=settings, backend=backend)
