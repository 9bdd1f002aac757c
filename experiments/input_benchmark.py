"""Throughput of a config's training input pipeline on this machine's CPUs (default: NFNet-F0's).

Runs the config's exact train pipeline (for F0: Inception crop fused with JPEG decoding, flip,
bicubic resize to 192 px, MixUp+CutMix over 2B decoded images -> B, RandAugment 4 layers at
magnitude 5, normalisation) on the synthetic source: ImageNet-sized (500x375) JPEGs, so no dataset
is needed. Prints one JSON line; `images_per_s_per_core` counts training (output) images per
wall-clock second divided by the cores this process may use, each image costing two decoded
JPEGs; `images_per_cpu_second` divides by the CPU time actually used instead, which stays
meaningful when other jobs share the machine.

    python -m experiments.input_benchmark            # F0 defaults
    python -m experiments.input_benchmark --steps=50 --batch_size=128
    python -m experiments.input_benchmark --config=configs/nfnet.py:F3 --config.data.augment.randaugment_magnitude=15
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from nfnets_jax.runtime import provenance

from . import command_line

FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config[:arg] whose data section is measured "
                                          "(default: configs/nfnet.py:F0).", lock_config=True, flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Training images per step.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("steps", 20, "Timed steps.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps first.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("height", 375, "Synthetic JPEG height.", lower_bound=8, flag_values=FLAGS)
flags.DEFINE_integer("width", 500, "Synthetic JPEG width.", lower_bound=8, flag_values=FLAGS)


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> dict:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], lambda: _CONFIG.value,
                             default_config=command_line.project_config("nfnet.py:F0"), flag_values=FLAGS, multihost=False)
    from nfnets_jax.data import pipeline  # pylint: disable=import-outside-toplevel  (TensorFlow)

    args = FLAGS
    config = _CONFIG.value.data.copy_and_resolve_references()
    config.name = "synthetic"
    config.synthetic.height, config.synthetic.width = args.height, args.width
    iterator = pipeline.make_train_iterator(config, global_batch_size=args.batch_size, seed=0,
                                            process_index=0, process_count=1,
                                            local_device_count=1)
    for _ in range(args.warmup_steps):
        next(iterator)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        next(iterator)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - start_cpu  # all threads of this process
    cores = _cpu_cores()
    images = args.steps * args.batch_size
    result = {
        "benchmark": "nfnet_f0_train_input_pipeline",
        "config": command_line.config_spec(FLAGS),
        "image_size": config.image_size,
        "randaugment": f"{config.augment.randaugment_layers}x{config.augment.randaugment_magnitude}",
        "mix": config.augment.mix,
        "source_jpeg": f"{args.width}x{args.height}",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "cpu_cores": cores,
        "images_per_s": round(images / seconds, 2),
        "images_per_s_per_core": round(images / seconds / cores, 2),
        "decoded_jpegs_per_s_per_core": round(2 * images / seconds / cores, 2),
        # Robust to other load on the machine: images per second of CPU time used.
        "images_per_cpu_second": round(images / cpu_seconds, 2),
        "provenance": provenance.collect(devices=False),  # TensorFlow-only: JAX is not started
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
