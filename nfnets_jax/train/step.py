"""The per-device train and eval steps, written once with `axis_name` collectives.

The train step follows the path of one step in the paper's order (paper App. A.1;
official `experiment.py:Experiment._train_fn`; docs/recipe.md):

    forward in compute_dtype (f32 master params cast, images cast, logits back to f32)
      -> label-smoothed loss on MixUp/CutMix targets
      -> per-device gradients in f32 -> pmean over devices (f32)
      -> the optimizer: AGC -> masked weight decay -> SGD-Nesterov with schedule (one optax
         chain), or any optax transformation; `optim.with_sam` around it takes its own
         gradients instead (ascent on a slice of this device's batch, unsynced; descent pmeaned)
      -> EMA -> metrics (averaged over devices; learning rate read from the optimizer state)

The same function runs under `jax.pmap` and under `jax.jit(jax.shard_map(...))`
(`nfnets_jax.train.parallel`). It sees one device's batch with its own leading example axis and
never indexes a device axis, and it never synchronises with the host: a non-finite step is
detected on device and reported through the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from jax import lax

from nfnets_jax import losses
from nfnets_jax import optim
from nfnets_jax.optim import ema as ema_lib
from nfnets_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
AXIS_NAME = "batch"


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the train step needs to know besides the model and the optimizer.

    Attributes:
      num_classes: size of the one-hot targets.
      label_smoothing: 0.1 in the paper (App. A.1).
      compute_dtype: dtype of the forward/backward pass (bfloat16 in the paper); params stay f32.
      ema_decay: the EMA decay (0.99999 in the paper, with the TF1 warmup), or None.
      agc_groups: label -> regex for the per-stage AGC clip fraction (logged whenever the
        optimizer state holds an AGC, whatever wraps it), or None for the global fraction only.

    SAM is not a setting of the step: it is part of the optimizer (`optim.with_sam`), which the
    step calls with the extra arguments SAM needs. A step whose loss or gradients are not
    finite never changes the state; whether the run then stops or carries on
    (config.nonfinite 'stop' | 'skip') is the loop's decision.
    """

    num_classes: int
    label_smoothing: float = 0.0
    compute_dtype: Any = jnp.float32
    ema_decay: float | None = None
    agc_groups: Mapping[str, str] | None = None


def _cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts every floating leaf of `tree` to `dtype`; integer leaves are left alone."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _pmean_floating(tree: Any, axis_name: str) -> Any:
    """Averages floating leaves over devices (e.g. BatchNorm statistics) so replicas agree."""
    return jax.tree.map(
        lambda x: lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite.

    Compiled for a GPU or TPU it is read from one sum per floating leaf: x·0 is 0 for a finite x
    and NaN for ±inf or NaN (IEEE 754), so the sum is NaN exactly when some element is not finite
    (and it cannot overflow, unlike a norm). XLA:TPU fuses such a sum into the pass that already
    reads the gradients (AGC's norms, the logged norm), where `jnp.all(jnp.isfinite(x))` took a
    pass of its own over every gradient: 0.57 ms of F0's 36.7 ms step by the TPU compiler's
    estimate (docs/tpu_step_cost_log.md). Compiled for the CPU it stays the `all` of `isfinite`,
    whose program XLA:CPU runs as before (`jax.lax.platform_dependent`, chosen when lowered).
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.array(True)

    def every_element_finite(*arrays):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))

    def sum_times_zero_finite(*arrays):
        sums = [jnp.sum(x * 0, dtype=jnp.float32) for x in arrays if jnp.issubdtype(x.dtype, jnp.floating)]
        return jnp.isfinite(sum(sums, jnp.float32(0)))

    return lax.platform_dependent(*leaves, cpu=every_element_finite, default=sum_times_zero_finite)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the `k` largest logits, per example."""
    k = min(k, logits.shape[-1])
    _, top = lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _leading_sizes(tree: Any) -> tuple[int, ...]:
    return tuple(jnp.shape(leaf)[0] for leaf in jax.tree.leaves(tree))


def make_train_step(
    forward: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    settings: StepSettings,
    axis_name: str = AXIS_NAME,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the per-device train step `(state, batch) -> (state, metrics)`.

    `batch` holds this device's `images` [B, H, W, 3], `labels`, `mix_labels` [B] and `ratio` [B]
    (the data contract in docs/CONTRACTS.md). The returned state and metrics are identical on
    every device (everything device-dependent is averaged), so backends return them replicated.

    `optimizer` is any optax transformation (plain, `GradientTransformationExtraArgs`, or
    wrapped in `optim.with_sam`). The step calls it as

        optimizer.update(grads, opt_state, params, grad_fn=grad_fn, batch=batch, axis_name=axis_name)

    with `grads` this step's gradients averaged over devices, `grad_fn(params, batch) -> grads`
    this device's (unaveraged) gradient of the loss on `batch`, and `batch` this device's
    examples. Transformations that take no extra arguments ignore them; `with_sam` uses them
    (its unsynced ascent per device, then the descent gradient averaged over `axis_name`), so
    it is the one SAM of the runner. When the optimizer evaluates `grad_fn` on the full batch
    (SAM's descent pass), the loss, accuracy, gradient norm and BatchNorm statistics reported
    are that pass's, and the pass at the unperturbed params is never computed (its outputs are
    unused, so XLA drops it).
    """
    optimizer = optax.with_extra_args_support(optimizer)

    def loss_fn(params, model_state, rng, batch):
        compute_params = _cast_floating(params, settings.compute_dtype)
        images = batch["images"].astype(settings.compute_dtype)
        logits, new_model_state = forward.apply(
            compute_params, model_state, rng, images, is_training=True
        )
        logits = logits.astype(jnp.float32)
        loss = jnp.mean(
            losses.softmax_cross_entropy(logits, batch["targets"], settings.label_smoothing)
        )
        return loss, (loss, logits, _cast_floating(new_model_state, jnp.float32))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        # Per-device RNG for dropout and stochastic depth: the replicated key, the step and this
        # device's index (jaxline's 'unique_host_unique_device'; docs/official_code_notes.md).
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(axis_name))
        targets = losses.mixed_targets(
            batch["labels"], batch["mix_labels"], batch["ratio"], settings.num_classes
        )
        example_batch = {"images": batch["images"], "targets": targets}
        full_batch = _leading_sizes(example_batch)

        def grad_with_aux(params, sub_batch):
            grads, aux = jax.grad(loss_fn, has_aux=True)(params, state.model_state, rng, sub_batch)
            return _cast_floating(grads, jnp.float32), aux

        full_batch_passes = []  # (grads, aux) of each pass the optimizer makes on the full batch

        def grad_fn(params, sub_batch):
            grads, aux = grad_with_aux(params, sub_batch)
            if _leading_sizes(sub_batch) == full_batch:
                full_batch_passes.append((grads, aux))
            return grads

        # ---- Gradients on this device, averaged over devices in f32, before AGC (official `optim.py:SGD_AGC`) ----
        local_grads, aux = grad_with_aux(state.params, example_batch)
        grads = lax.pmean(local_grads, axis_name)

        # ---- The optimizer: AGC -> weight decay -> SGD (one optax chain), maybe inside SAM ----
        updates, new_opt_state = optimizer.update(
            grads, state.opt_state, state.params, grad_fn=grad_fn, batch=example_batch, axis_name=axis_name)
        if full_batch_passes:  # it took its own gradients (SAM's descent): report that pass
            local_grads, aux = full_batch_passes[-1]
            grads = lax.pmean(local_grads, axis_name)
        loss, logits, new_model_state = aux
        loss = lax.pmean(loss, axis_name)
        new_model_state = _pmean_floating(new_model_state, axis_name)

        # ---- Apply, then EMA ----
        new_params = optax.apply_updates(state.params, updates)
        new_ema = state.ema_params
        if settings.ema_decay is not None and state.ema_params is not None:
            new_ema = ema_lib.ema_update(state.ema_params, new_params, state.step, settings.ema_decay)

        # ---- A non-finite step never changes the values (the loop stops or skips) ----
        # Floating leaves (params, momentum, EMA, BN statistics, injected hyperparameters) keep
        # their old values; integer leaves (optax's step counts) advance with `state.step`, so
        # that after a skipped step the schedule and the EMA warmup still read the same step.
        finite = jnp.isfinite(loss) & _all_finite(grads)
        keep = lambda new, old: jax.tree.map(
            lambda n, o: jnp.where(finite, n, o) if jnp.issubdtype(n.dtype, jnp.floating) else n,
            new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            model_state=keep(new_model_state, state.model_state),
            opt_state=keep(new_opt_state, state.opt_state),
            ema_params=keep(new_ema, state.ema_params),
            rng=state.rng,
        )

        # ---- Metrics, averaged over devices ----
        metrics = {
            "loss": loss,
            "top_1_acc": lax.pmean(jnp.mean(topk_correct(logits, batch["labels"], 1)), axis_name),
            # from AGC's per-unit reductions of the same trees: no pass of their own (agc.global_norm)
            "grad_norm": optim.global_norm(grads),
            "param_norm": optim.global_norm(state.params),
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        # The learning rate (and momentum, ...) this step applied, read from the optimizer state.
        metrics.update(optim.current_hyperparams(new_opt_state))
        metrics.update(optim.clip_fraction_metrics(new_opt_state, settings.agc_groups))
        return new_state, metrics

    return train_step


def make_eval_step(
    forward: hk.TransformedWithState, axis_name: str = AXIS_NAME
) -> Callable[[hk.Params, hk.State, Batch], Metrics]:
    """Builds the per-device eval step `(params, model_state, batch) -> summed counts`.

    Eval runs in float32 (as the official code does) with `is_training=False`. It returns sums
    over the real examples of the whole global batch (`mask` is 0 on padding), so that the caller
    divides once by the number of examples: no example is dropped or double-counted when the
    eval set does not divide by the batch. The loss is plain cross-entropy, without smoothing,
    like the official `eval_loss` (official `experiment.py:Experiment._eval_fn`).
    """

    def eval_step(params: hk.Params, model_state: hk.State, batch: Batch) -> Metrics:
        logits, _ = forward.apply(params, model_state, None, batch["images"], is_training=False)
        logits = logits.astype(jnp.float32)
        mask = batch["mask"].astype(jnp.float32)
        one_hot = jax.nn.one_hot(batch["labels"], logits.shape[-1], dtype=jnp.float32)
        per_example_loss = losses.softmax_cross_entropy(logits, one_hot, 0.0)
        sums = {
            "top_1_correct": jnp.sum(mask * topk_correct(logits, batch["labels"], 1)),
            "top_5_correct": jnp.sum(mask * topk_correct(logits, batch["labels"], 5)),
            "loss_sum": jnp.sum(mask * per_example_loss),
            "count": jnp.sum(mask),
        }
        return lax.psum(sums, axis_name)

    return eval_step
