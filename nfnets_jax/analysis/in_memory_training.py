"""Many small training runs on an in-memory data set in one compiled program, for the miniature
reproductions of `experiments.reproduce` (docs/reproduction.md): Fashion-MNIST downsampled
(`load_fashion_mnist`) and the digits (`load_digits`).

The full training loop (`experiments.train`) is built for one long run per process; a study
such as the AGC λ × batch-size grid (Brock et al. 2021 §4.1, Fig. 2) needs dozens of short runs
that differ in seed, clipping threshold λ, batch size, number of steps and learning rate. On a
loaded CPU, compiling costs minutes, so every one of those settings is a *traced* value here and
one compiled program trains them all:

- a run's batch of `batch_size` examples is processed as `batch_size / microbatch` microbatches
  whose gradients are averaged (for the NF models exactly the full-batch gradient; BatchNorm
  then normalises over each microbatch, "ghost" batch norm, as it does per device in the
  paper's data-parallel BN baselines);
- the steps and the microbatches are `lax.fori_loop`s with traced trip counts;
- λ is a traced scalar of `optim.adaptive_grad_clip` (`inf`: no clipping);
- runs follow one another inside the program (`lax.map`): batching them with `jax.vmap` turns
  every convolution into a grouped one, whose weight gradient XLA:CPU computes 10–1000× slower
  (`models/grouped_conv.py`).

Each run uses the forward its caller builds with `models.make_forward` (the registry's models), the
library's loss (`losses.softmax_cross_entropy`) and optimizer pieces (`optim.adaptive_grad_clip`
masked off the classifier and masked coupled weight decay, as `optim.make_optimizer` chains them,
then Nesterov momentum with the library's linear-warmup cosine learning rate,
`optim.schedules.warmup_cosine_at`), on batches drawn without
replacement from the in-memory train split (a fresh permutation each epoch, the last partial
batch of an epoch dropped), and is evaluated on the whole test split at the end. With
`clip_groups` (label -> parameter-path regex, e.g. `models.stage_regexes`), a run also reports
the fraction of AGC units clipped in each group, averaged over all its steps and over its first
tenth (`optim.agc.clip_fraction_metrics`): what shows that AGC, not something else, is acting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax import losses
from nfnets_jax.optim import agc as agc_lib
from nfnets_jax.optim import config as optim_config
from nfnets_jax.optim import groups as groups_lib
from nfnets_jax.optim import schedules

NUM_CLASSES = 10
NO_CLIPPING = math.inf  # the λ that never clips: AGC off, in the same compiled program


@dataclasses.dataclass(frozen=True)
class InMemoryData:
    """Train/test splits as float32 NHWC arrays, normalised per channel with the train split's
    statistics, and int32 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _normalised(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray) -> InMemoryData:
    train_images = train_images.astype(np.float32)
    mean = train_images.mean(axis=(0, 1, 2))
    std = train_images.std(axis=(0, 1, 2)) + 1e-6
    normalise = lambda images: ((images.astype(np.float32) - mean) / std).astype(np.float32)
    return InMemoryData(normalise(train_images), train_labels.astype(np.int32),
                        normalise(test_images), test_labels.astype(np.int32))


def downsample(images: np.ndarray, image_size: int) -> np.ndarray:
    """[N, H, H] -> float32 [N, image_size, image_size, 1]: the mean of each k×k block when
    `image_size` divides H by an integer k (28 -> 14: exact area averaging), else an
    antialiased bilinear resize (`jax.image.resize`)."""
    size = images.shape[1]
    images = images.astype(np.float32)
    if size % image_size == 0:
        k = size // image_size
        out = images.reshape(len(images), image_size, k, image_size, k).mean(axis=(2, 4))
    else:
        out = np.asarray(jax.image.resize(jnp.asarray(images), (len(images), image_size, image_size),
                                          method="linear", antialias=True))
    return out[..., None]


def load_fashion_mnist(image_size: int, manual_dir: str | None = None) -> InMemoryData:
    """Fashion-MNIST's 60,000 train / 10,000 test images (Zalando's split), grey, downsampled to
    `image_size` px (`downsample`), read from the idx files (`data.fashion_mnist.read_split`,
    checksums verified; default folder: Debian's). Raises FileNotFoundError with the one-line
    fix when the files are missing."""
    from nfnets_jax.data import fashion_mnist  # pylint: disable=import-outside-toplevel  (imports TFDS)

    manual_dir = manual_dir or fashion_mnist.DEBIAN_DIR
    train_images, train_labels = fashion_mnist.read_split(manual_dir, "train")
    test_images, test_labels = fashion_mnist.read_split(manual_dir, "test")
    return _normalised(downsample(train_images, image_size), train_labels,
                       downsample(test_images, image_size), test_labels)


def load_digits(image_size: int, test_fraction: float = 0.2, split_seed: int = 0) -> InMemoryData:
    """The same stratified split the digits demo trains on (`data.sources.load_digits_arrays`)."""
    from nfnets_jax.data import sources  # pylint: disable=import-outside-toplevel  (imports TF)

    arrays = sources.load_digits_arrays(image_size, test_fraction, split_seed)
    return _normalised(*arrays["train"], *arrays["test"])


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run. The learning rate warms up linearly from 0 to `peak_lr` over
    `warmup_steps`, then decays to 0 at `steps` with a cosine (the paper's schedule, §4.1)."""

    seed: int
    clipping: float  # AGC λ; NO_CLIPPING (inf) for none
    batch_size: int
    steps: int
    peak_lr: float
    warmup_steps: int


def steps_for_epochs(epochs: float, batch_size: int, num_train: int) -> int:
    """Steps that show the model `epochs` passes of the train split at `batch_size` (≥ 1)."""
    return max(1, math.ceil(epochs * num_train / batch_size))


def make_gradient_transform(clipping: jax.Array, weight_decay: float, momentum: float
                            ) -> optax.GradientTransformation:
    """AGC (λ = `clipping`, classifier excluded) → masked weight decay → Nesterov momentum:
    `optim.make_optimizer`'s chain with the default exclusions, before the −learning-rate
    scaling (applied by the caller, since the schedule's settings are traced)."""
    return optax.chain(
        optax.masked(agc_lib.adaptive_grad_clip(clipping),
                     groups_lib.exclusion_mask(optim_config.DEFAULT_AGC_EXCLUDE)),
        optax.masked(optax.add_decayed_weights(weight_decay),
                     groups_lib.exclusion_mask(optim_config.DEFAULT_WD_EXCLUDE)),
        optax.trace(decay=momentum, nesterov=True),
    )


def make_run_fn(forward: hk.TransformedWithState, data: InMemoryData, microbatch: int,
                weight_decay: float = 5e-5, momentum: float = 0.9, eval_batch: int = 1000,
                clip_groups: Mapping[str, str] | None = None):
    """`run(spec_arrays) -> {'test_acc', 'diverged', 'final_loss', ...}` for one run, every field
    of `RunSpec` a traced scalar: init from the seed, `steps` SGD steps, then top-1 on the test
    split (in chunks of `eval_batch`).

    `diverged` is 1.0 if any step's loss was not finite (the run carries on with its NaN
    parameters, so its test accuracy is that of a broken network, about chance).
    `final_loss` is the training loss of the last step. With `clip_groups`, also
    `clip_fraction/<label>` and `clip_fraction_early/<label>`: the fraction of AGC units clipped
    in each group, averaged over all steps and over the first tenth of them.
    """
    train_images, train_labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    num_train = train_images.shape[0]
    num_test = data.test_images.shape[0]
    num_chunks = -(-num_test // eval_batch)
    pad = num_chunks * eval_batch - num_test
    test_images = jnp.asarray(np.concatenate([data.test_images, data.test_images[:pad]]))
    test_labels = jnp.asarray(np.concatenate([data.test_labels, data.test_labels[:pad]]))
    test_images = test_images.reshape(num_chunks, eval_batch, *test_images.shape[1:])
    test_labels = test_labels.reshape(num_chunks, eval_batch)
    counted = (np.arange(num_chunks * eval_batch) < num_test).reshape(num_chunks, eval_batch)
    labels_of_groups = sorted(clip_groups or {})

    def run(spec: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        key = jax.random.PRNGKey(spec["seed"])
        init_key, data_key, dropout_key = jax.random.split(key, 3)
        params, model_state = forward.init(init_key, train_images[:2], True)
        transform = make_gradient_transform(spec["clipping"], weight_decay, momentum)
        opt_state = transform.init(params)
        num_micro = spec["batch_size"] // microbatch
        steps_per_epoch = jnp.maximum(num_train // spec["batch_size"], 1)
        early_steps = jnp.maximum(spec["steps"] // 10, 1)

        def step(index, carry):
            params, model_state, opt_state, order, diverged, _, clip_sums = carry
            epoch, position = index // steps_per_epoch, index % steps_per_epoch
            order = jax.lax.cond(position == 0,
                                 lambda: jax.random.permutation(jax.random.fold_in(data_key, epoch), num_train),
                                 lambda: order)

            def accumulate(micro, inner):
                grads_sum, loss_sum, model_state = inner
                start = position * spec["batch_size"] + micro * microbatch
                picked = jax.lax.dynamic_slice(order, (start,), (microbatch,))
                images, labels = train_images[picked], train_labels[picked]
                targets = jax.nn.one_hot(labels, NUM_CLASSES, dtype=jnp.float32)
                rng = jax.random.fold_in(jax.random.fold_in(dropout_key, index), micro)

                def loss_fn(params):
                    logits, new_state = forward.apply(params, model_state, rng, images, True)
                    return jnp.mean(losses.softmax_cross_entropy(logits, targets)), new_state

                (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
                return jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, model_state

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, loss, model_state = jax.lax.fori_loop(
                0, num_micro, accumulate, (zeros, jnp.zeros((), jnp.float32), model_state))
            grads = jax.tree.map(lambda g: g / num_micro, grads)
            loss = loss / num_micro
            updates, opt_state = transform.update(grads, opt_state, params)
            lr = schedules.warmup_cosine_at(index, spec["peak_lr"], spec["warmup_steps"], spec["steps"])
            params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
            diverged = jnp.maximum(diverged, 1.0 - jnp.isfinite(loss).astype(jnp.float32))
            if labels_of_groups:
                metrics = agc_lib.clip_fraction_metrics(opt_state, clip_groups)
                now = jnp.stack([metrics.get(f"agc/clip_fraction/{label}", jnp.float32(jnp.nan))
                                 for label in labels_of_groups])
                early = (index < early_steps).astype(jnp.float32)
                clip_sums = clip_sums + jnp.stack([now, early * now])
            return params, model_state, opt_state, order, diverged, loss, clip_sums

        init = (params, model_state, opt_state, jnp.arange(num_train), jnp.zeros((), jnp.float32),
                jnp.zeros((), jnp.float32), jnp.zeros((2, len(labels_of_groups)), jnp.float32))
        params, model_state, _, _, diverged, last_loss, clip_sums = jax.lax.fori_loop(
            0, spec["steps"], step, init)

        def evaluate(chunk):
            images, labels, mask = chunk
            logits, _ = forward.apply(params, model_state, None, images, False)
            return jnp.sum((jnp.argmax(logits, axis=-1) == labels) * mask)

        correct = jax.lax.map(evaluate, (test_images, test_labels, jnp.asarray(counted, jnp.float32)))
        result = {"test_acc": jnp.sum(correct) / num_test, "diverged": diverged, "final_loss": last_loss}
        for i, label in enumerate(labels_of_groups):
            result[f"clip_fraction/{label}"] = clip_sums[0, i] / spec["steps"]
            result[f"clip_fraction_early/{label}"] = clip_sums[1, i] / jnp.minimum(early_steps, spec["steps"])
        return result

    return run


class RunTrainer:
    """Compiles `make_run_fn` once for chunks of `chunk_size` runs and trains any `RunSpec`s
    with it (shorter chunks are padded with copies of their first run, whose results are dropped).

    `fast_compile` turns off XLA:CPU's LLVM optimisations: the compile is ~2.5× faster and the
    program ~30× slower (measured on a 14-layer NF-ResNet at 8 px), right for a few steps only.
    """

    def __init__(self, forward: hk.TransformedWithState, data: InMemoryData, *, microbatch: int,
                 chunk_size: int, weight_decay: float = 5e-5, momentum: float = 0.9, fast_compile: bool = False,
                 eval_batch: int = 1000, clip_groups: Mapping[str, str] | None = None):
        self.data, self.microbatch, self.chunk_size = data, microbatch, chunk_size
        self.fast_compile = fast_compile
        run = make_run_fn(forward, data, microbatch, weight_decay, momentum,
                          eval_batch=min(eval_batch, data.test_images.shape[0]), clip_groups=clip_groups)
        self._program = jax.jit(lambda specs: jax.lax.map(run, specs))
        self._compiled = None

    def check(self, spec: RunSpec) -> None:
        """Rejects a run this trainer cannot do, before any compile."""
        num_train = self.data.train_images.shape[0]
        if spec.batch_size % self.microbatch or not 0 < spec.batch_size <= num_train:
            raise ValueError(f"batch_size {spec.batch_size} must be a multiple of the microbatch "
                             f"{self.microbatch} and at most the {num_train} training examples.")
        if not 0 <= spec.warmup_steps < spec.steps:
            raise ValueError(f"warmup ({spec.warmup_steps} steps) must be shorter than training "
                             f"({spec.steps} steps).")

    def _arrays(self, specs: Sequence[RunSpec]) -> dict[str, jax.Array]:
        padded = list(specs) + [specs[0]] * (self.chunk_size - len(specs))
        column = lambda name, dtype: jnp.asarray([getattr(s, name) for s in padded], dtype)
        return {"seed": column("seed", jnp.uint32), "clipping": column("clipping", jnp.float32),
                "batch_size": column("batch_size", jnp.int32), "steps": column("steps", jnp.int32),
                "peak_lr": column("peak_lr", jnp.float32), "warmup_steps": column("warmup_steps", jnp.float32)}

    def train(self, specs: Sequence[RunSpec]) -> list[dict[str, float]]:
        """Results of `specs` (at most `chunk_size`), in order: test_acc, diverged, final_loss
        (and the clip fractions when the trainer has `clip_groups`)."""
        if not 0 < len(specs) <= self.chunk_size:
            raise ValueError(f"train takes 1 to {self.chunk_size} runs, got {len(specs)}.")
        for spec in specs:
            self.check(spec)
        arrays = self._arrays(specs)
        if self._compiled is None:
            fast = self.fast_compile and jax.default_backend() == "cpu"
            options = {"xla_backend_optimization_level": 0} if fast else None
            self._compiled = self._program.lower(arrays).compile(compiler_options=options)
        results = jax.device_get(self._compiled(arrays))
        return [{name: float(values[i]) for name, values in results.items()} for i in range(len(specs))]
