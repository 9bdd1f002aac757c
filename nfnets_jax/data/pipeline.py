"""Train and eval input pipelines: per-process sharding, per-device batching, exact resume.

Layout (official `dataset.py:_shard`): every process yields numpy batches
`[local_devices, per_device_batch, H, W, 3]` with global_batch =
process_count × local_devices × per_device_batch. Evaluation: every process reads its own
contiguous slice of the split (np.array_split of the example range).

Determinism and resume. Random-access sources (digits, synthetic: `Source.lookup`) give one
GLOBAL stream, independent of the process layout: epoch e of the whole split is read in an
order seeded by (seed, e); step s consumes global stream positions [s·G·k, (s+1)·G·k) (G the
global batch, k inputs per output: 2 when mixing), and process p takes the contiguous part of
them that feeds its devices (global devices p·L ... p·L+L−1). The element at global position g is
augmented with stateless ops seeded by (seed, g); the mixing of global device group (s, d) and
the RandAugment of its outputs are seeded by (seed, s·D + d) with D global devices. So the
global batch at step s is the same for any split of the same D devices into processes (and,
without mixing, for any D), and a run resumes exactly on another number of processes.
TFDS sources are read from files: each process reads its own contiguous slice of the split
(np.array_split of the example range, the rule of `tfds.even_splits`) in an order seeded by
(seed, process, epoch), with seeds keyed by (seed, process, position); their stream therefore
depends on the process count, and resuming one needs the same count.

`start_step=k` skips k steps' worth of elements before any decoding and yields exactly the
batches k, k+1, ... of a fresh stream. (One exception: an undecodable image is dropped and
logged, which shifts the rest of the stream by one element; `start_step=k` assumes no drops
before step k, so a resume after a drop is offset from the fresh stream by the number of
earlier drops.)

Per device, one step takes 2B examples when mixing (B otherwise), mixes them to B
(`mixing.py`), then applies RandAugment after mixing (NFNets) or before (`augment_before_mix`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Iterator, NamedTuple

import jax
import ml_collections
import numpy as np

from nfnets_jax.runtime.program_output import import_tensorflow

import_tensorflow()  # TensorFlow's C++ start-up notices held back (runtime/program_output.py)
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

from nfnets_jax.data import mixing, preprocess, randaugment
from nfnets_jax.data.config import validate_data_config
from nfnets_jax.data.sources import Source, make_source

# Distinct streams of stateless randomness.
_PREPROCESS_STREAM, _AUGMENT_STREAM, _MIX_STREAM, _POST_MIX_AUGMENT_STREAM = 1, 2, 3, 4
_SHUFFLE_STREAM = 5
_log = logging.getLogger(__name__)  # our warnings: shown by program_output, not held back as absl's


class DatasetInfo(NamedTuple):
    num_classes: int
    num_train_examples: int
    num_eval_examples: int


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one global batch divides over processes and their local devices."""
    global_batch_size: int
    process_index: int
    process_count: int
    local_device_count: int

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def per_device_batch_size(self) -> int:
        return self.local_batch_size // self.local_device_count


def batch_layout(global_batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None,
                 local_device_count: int | None = None) -> BatchLayout:
    """Checks that the global batch divides over processes × local devices, before any I/O."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_device_count = (jax.local_device_count() if local_device_count is None
                          else local_device_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    devices = process_count * local_device_count
    if global_batch_size <= 0 or global_batch_size % devices:
        nearest = max(1, round(global_batch_size / devices)) * devices
        raise ValueError(
            f"global_batch_size={global_batch_size} does not divide over {process_count} "
            f"process(es) x {local_device_count} local device(s) = {devices} devices; use a "
            f"positive multiple of {devices} (e.g. {nearest}).")
    return BatchLayout(global_batch_size, process_index, process_count, local_device_count)


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of this process's contiguous slice: np.array_split / tfds.even_splits sizes.

    Slices are disjoint, cover every example, and differ in size by at most one.
    """
    base, extra = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """Number of classes and of train/eval examples (the whole splits, all processes)."""
    validate_data_config(data_config)
    source = make_source(data_config)
    return DatasetInfo(source.num_classes, source.split_size(data_config.train_split),
                       source.split_size(data_config.eval_split))


# --------------------------------------------------------------------------------------------
# Shared helpers.


def _seeder(seed: int, process_index: int, stream: int):
    """index -> stateless seed for element/step `index` of `stream`; a function of the arguments.

    The stream's own seed is computed once, eagerly, here, not again for every element.
    """
    base = tf.constant([seed, process_index], tf.int64)
    stream_seed = tf.random.experimental.stateless_fold_in(base, stream)
    return lambda index: tf.random.experimental.stateless_fold_in(stream_seed,
                                                                  tf.cast(index, tf.int64))


def _python_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _image_sizes(data_config: ml_collections.ConfigDict, source: Source) -> tuple[int, int]:
    """(train px, eval px); fixed-size sources (digits) keep their own size."""
    if source.fixed_size:
        return int(data_config.digits.image_size), int(data_config.digits.image_size)
    return int(data_config.image_size), int(data_config.eval_image_size)


def _options(data_config: ml_collections.ConfigDict) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if data_config.threads:
        options.threading.private_threadpool_size = int(data_config.threads)
    return options


def _parallel(data_config: ml_collections.ConfigDict) -> int:
    calls = int(data_config.num_parallel_calls)
    return tf.data.AUTOTUNE if calls == -1 else calls


def _finish_image(image: tf.Tensor, seed: tf.Tensor, source: Source,
                  augment: ml_collections.ConfigDict) -> tf.Tensor:
    """Optional RandAugment on the clipped, truncated uint8 image, then normalisation.

    Official order (`_augment_image`): clip to [0, 255], cast to uint8, RandAugment, back to float.
    """
    if augment.randaugment_layers > 0:
        as_uint8 = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
        image = randaugment.randaugment(as_uint8, seed, augment.randaugment_layers,
                                        augment.randaugment_magnitude)
    return preprocess.normalize(image, source.mean_rgb, source.stddev_rgb)


# --------------------------------------------------------------------------------------------
# Training.


def _train_positions(source: Source, split: str, start: int, end: int, first_position: int,
                     seed: int, process_index: int, shuffle_buffer: int) -> tf.data.Dataset:
    """The endless (position, example) stream of one process of a file-backed (TFDS) source,
    from `first_position` on.

    Epoch e holds positions [e·n, (e+1)·n) of the process's n examples. TFDS reads its files
    in one order seeded by (seed, process) and shuffles records with a buffer seeded by
    (seed, process, e). `.skip` drops the consumed records before anything is decoded.
    (Random-access sources use `_global_train_positions` instead.)
    """
    epoch_size = end - start
    first_epoch = first_position // epoch_size
    records = source.read(split, start, end, _python_seed(seed, process_index))
    stream_seed = _python_seed(seed, process_index, _SHUFFLE_STREAM)

    def epoch_examples(epoch):
        if shuffle_buffer <= 1:
            return records
        epoch_seed = epoch * 1_000_003 + stream_seed  # distinct for every epoch
        return records.shuffle(min(shuffle_buffer, epoch_size), seed=epoch_seed,
                               reshuffle_each_iteration=False)

    examples = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_examples)
    examples = examples.skip(first_position - first_epoch * epoch_size)
    return tf.data.Dataset.zip(tf.data.Dataset.range(first_position, 2**62), examples)


def _global_train_positions(source: Source, split: str, num_examples: int, first_step: int,
                            seed: int, layout: BatchLayout, group_inputs: int) -> tf.data.Dataset:
    """This process's (global position, example) stream of a random-access source, from step
    `first_step` on; the same global stream whatever the process layout (module docstring).

    Epoch e holds global positions [e·N, (e+1)·N) of the N examples, in the order of one exact
    permutation seeded by (seed, e). Step s takes positions [s·T, (s+1)·T) with T the inputs of
    all devices; process p keeps the chunk [s·T + p·C, s·T + (p+1)·C) with C its devices' inputs.
    """
    lookup = source.lookup(split)
    shuffle_seed = _seeder(seed, 0, _SHUFFLE_STREAM)
    chunk = group_inputs * layout.local_device_count
    step_inputs = chunk * layout.process_count
    first_position = first_step * step_inputs
    first_epoch = first_position // num_examples

    def epoch_examples(epoch):
        positions = epoch * num_examples + tf.range(num_examples, dtype=tf.int64)
        order = tf.argsort(tf.random.stateless_uniform([num_examples], shuffle_seed(epoch)))
        mine = (((positions // chunk) % layout.process_count == layout.process_index)
                & (positions >= first_position))
        return tf.data.Dataset.from_tensor_slices(
            (tf.boolean_mask(positions, mine), tf.boolean_mask(tf.cast(order, tf.int64), mine)))

    examples = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_examples)
    return examples.map(lambda position, index: (position, lookup(index)))


def make_train_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                        seed: int, start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None,
                        local_device_count: int | None = None) -> Iterator[dict]:
    """The infinite training stream of numpy batches (docs/CONTRACTS.md, data section).

    Yields {'images': f32 [D, B, H, W, 3], 'labels': i32 [D, B], 'mix_labels': i32 [D, B],
    'ratio': f32 [D, B]} with D local devices and B examples per device; the loss target is
    ratio·onehot(labels) + (1 − ratio)·onehot(mix_labels). `start_step=k` yields the batches
    k, k+1, ... of the stream started at 0, skipping the elements of steps < k before decoding.
    The process/device overrides simulate other topologies (tests); they default to jax's.
    """
    validate_data_config(data_config)
    layout = batch_layout(global_batch_size, process_index=process_index,
                          process_count=process_count, local_device_count=local_device_count)
    augment = data_config.augment
    inputs_per_output = mixing.INPUTS_PER_OUTPUT[augment.mix]
    if augment.mix == "mixup_cutmix" and layout.per_device_batch_size % 2:
        raise ValueError(
            f"augment.mix='mixup_cutmix' mixes half of each device's batch with MixUp and half "
            f"with CutMix, so the per-device batch must be even; global_batch_size="
            f"{global_batch_size} gives {layout.per_device_batch_size} per device.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")

    source = make_source(data_config)
    train_size, _ = _image_sizes(data_config, source)
    num_examples = source.split_size(data_config.train_split)
    start, end = process_range(num_examples, layout.process_index, layout.process_count)
    layout_free = source.lookup is not None  # one global stream (module docstring)
    if not layout_free and end <= start:
        raise ValueError(f"Process {layout.process_index} has no training examples: the split "
                         f"{data_config.train_split!r} is smaller than the process count.")
    per_device = layout.per_device_batch_size
    group_inputs = per_device * inputs_per_output
    step_inputs = group_inputs * layout.local_device_count
    proc = layout.process_index
    global_devices = layout.process_count * layout.local_device_count
    parallel = _parallel(data_config)
    # Random-access sources: randomness keyed by global positions and device groups only.
    seed_owner = 0 if layout_free else proc
    preprocess_seed, augment_seed, mix_seed, post_mix_augment_seed = (
        _seeder(seed, seed_owner, stream) for stream in
        (_PREPROCESS_STREAM, _AUGMENT_STREAM, _MIX_STREAM, _POST_MIX_AUGMENT_STREAM))

    def global_group(local_group):
        """Local device group index (step·L + d) -> global (step·D + p·L + d) when layout-free."""
        if not layout_free:
            return local_group
        step, device = local_group // layout.local_device_count, local_group % layout.local_device_count
        return step * global_devices + proc * layout.local_device_count + device

    def preprocess_example(position, example):
        element_seed = preprocess_seed(position)
        if source.fixed_size:
            image = preprocess.random_shift(example["image"], element_seed,
                                            int(data_config.digits.max_shift))
        elif data_config.train_preprocess == "pad_crop_flip":
            image = preprocess.pad_crop_flip(example["image"], element_seed, encoded=source.encoded,
                                             image_size=train_size,
                                             max_shift=int(data_config.max_shift))
        else:
            image = preprocess.train_preprocess(example["image"], element_seed,
                                                encoded=source.encoded, image_size=train_size)
        if augment.augment_before_mix:
            image = _finish_image(image, augment_seed(position), source, augment)
        image = tf.ensure_shape(image, (train_size, train_size, 3))
        return {"image": image, "label": example["label"], "position": position}

    def mix_group(group_index, group):
        group_index = global_group(group_index)
        mixed = mixing.mix_batch({"image": group["image"], "label": group["label"]},
                                 mix_seed(group_index), augment.mix,
                                 augment.mixup_alpha)
        mixed["output_index"] = group_index * per_device + tf.range(per_device, dtype=tf.int64)
        mixed["last_position"] = tf.fill([per_device], tf.reduce_max(group["position"]))
        return mixed

    def finish_example(example):
        if not augment.augment_before_mix:
            example["images"] = _finish_image(example["images"],
                                              post_mix_augment_seed(example["output_index"]),
                                              source, augment)
        del example["output_index"]
        return example

    def pipeline(positions: tf.data.Dataset, first_step: int) -> tf.data.Dataset:
        dataset = positions.map(preprocess_example, num_parallel_calls=parallel)
        dataset = dataset.ignore_errors(log_warning=True)  # undecodable images: skip, log
        dataset = dataset.batch(group_inputs, drop_remainder=True)
        dataset = dataset.enumerate(start=first_step * layout.local_device_count)
        dataset = dataset.map(mix_group, num_parallel_calls=parallel)
        dataset = dataset.unbatch().map(finish_example, num_parallel_calls=parallel)
        dataset = dataset.batch(per_device, drop_remainder=True)
        dataset = dataset.batch(layout.local_device_count, drop_remainder=True)
        dataset = dataset.prefetch(int(data_config.prefetch))
        return dataset.with_options(_options(data_config))

    def batches() -> Iterator[dict]:
        step = start_step
        if layout_free:  # this process's chunk of each step's global positions
            stride = step_inputs * layout.process_count
            # The last global position of this process's chunk of the step before `start_step`
            # (with several processes, the chunks of the others lie between two of ours).
            last_position = (start_step - 1) * stride + proc * step_inputs + step_inputs - 1
            positions = _global_train_positions(source, data_config.train_split, num_examples,
                                                start_step, seed, layout, group_inputs)
        else:
            stride = step_inputs
            last_position = start_step * step_inputs - 1
            positions = _train_positions(source, data_config.train_split, start, end,
                                         start_step * step_inputs, seed, proc,
                                         int(data_config.shuffle_buffer))
        skipped = 0
        for batch in pipeline(positions, step).as_numpy_iterator():
            batch_last = int(batch.pop("last_position").max())
            newly_skipped = batch_last - last_position - stride
            if newly_skipped:
                skipped += newly_skipped
                _log.warning("Input pipeline: skipped %d undecodable image(s) so far "
                                "(process %d, step %d).", skipped, proc, step)
            last_position = batch_last
            step += 1
            yield batch

    return batches()


# --------------------------------------------------------------------------------------------
# Evaluation.


def num_eval_steps(num_examples: int, layout: BatchLayout) -> int:
    """Steps every process runs: enough for the largest process slice (all run the same)."""
    start, end = process_range(num_examples, 0, layout.process_count)  # process 0's is largest
    return math.ceil((end - start) / layout.local_batch_size)


def make_eval_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       local_device_count: int | None = None) -> Iterator[dict]:
    """One finite pass over the eval split; every example exactly once across processes.

    Same layout as training plus `mask` (1 real, 0 padding): each process pads its slice with
    masked examples up to the same number of steps, so collective steps stay in lockstep and
    any split size works. `mix_labels` equals `labels` and `ratio` is 1.
    """
    validate_data_config(data_config)
    layout = batch_layout(global_batch_size, process_index=process_index,
                          process_count=process_count, local_device_count=local_device_count)
    source = make_source(data_config)
    _, eval_size = _image_sizes(data_config, source)
    mode = "none" if source.fixed_size else data_config.eval_preprocess
    total = source.split_size(data_config.eval_split)
    start, end = process_range(total, layout.process_index, layout.process_count)
    steps = num_eval_steps(total, layout)
    parallel = _parallel(data_config)

    @tf.autograph.experimental.do_not_convert  # plain TF ops; AutoGraph cannot parse its generator
    def preprocess_example(example):
        image = preprocess.eval_preprocess(example["image"], encoded=source.encoded,
                                           image_size=eval_size, mode=mode)
        image = preprocess.normalize(image, source.mean_rgb, source.stddev_rgb)
        return {"images": tf.ensure_shape(image, (eval_size, eval_size, 3)),
                "labels": example["label"], "mix_labels": example["label"],
                "ratio": tf.constant(1.0, tf.float32), "mask": tf.constant(1.0, tf.float32)}

    padding = tf.data.Dataset.from_tensors({
        "images": tf.zeros((eval_size, eval_size, 3), tf.float32),
        "labels": tf.constant(0, tf.int32), "mix_labels": tf.constant(0, tf.int32),
        "ratio": tf.constant(1.0, tf.float32), "mask": tf.constant(0.0, tf.float32)}).repeat()

    dataset = source.read(data_config.eval_split, start, end, None)
    dataset = dataset.map(preprocess_example, num_parallel_calls=parallel)
    dataset = dataset.ignore_errors(log_warning=True)
    dataset = dataset.concatenate(padding).take(steps * layout.local_batch_size)
    dataset = dataset.batch(layout.per_device_batch_size).batch(layout.local_device_count)
    dataset = dataset.prefetch(int(data_config.prefetch)).with_options(_options(data_config))

    def batches() -> Iterator[dict]:
        seen = 0
        for batch in dataset.as_numpy_iterator():
            seen += int(batch["mask"].sum())
            yield batch
        if seen != end - start:
            _log.warning("Eval pipeline: skipped %d undecodable image(s) of %d (process %d).",
                            end - start - seen, end - start, layout.process_index)

    return batches()
