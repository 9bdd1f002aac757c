"""Throughput of the NFNet-F0 training input pipeline on this machine's CPUs.

Runs the exact F0 train pipeline (Inception crop fused with JPEG decoding, flip, bicubic
resize to 192 px, MixUp+CutMix over 2B decoded images -> B, RandAugment 4 layers at magnitude
5, normalisation) on the synthetic source: ImageNet-sized (500x375) JPEGs, so no dataset is
needed. Prints one JSON line; `images_per_s_per_core` counts training (output) images per
wall-clock second divided by the cores this process may use, each image costing two decoded
JPEGs; `images_per_cpu_second` divides by the CPU time actually used instead, which stays
meaningful when other jobs share the machine.

    python -m experiments.input_benchmark            # F0 defaults
    python -m experiments.input_benchmark --steps=50 --batch_size=128
"""

from __future__ import annotations

import argparse
import json
import os
import time

from nfnets_jax.runtime import provenance
from nfnets_jax.data import config as data_config_lib
from nfnets_jax.data import pipeline


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64, help="training images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first")
    parser.add_argument("--image_size", type=int, default=192, help="train px (F0: 192)")
    parser.add_argument("--randaugment_magnitude", type=int, default=5)
    parser.add_argument("--height", type=int, default=375, help="synthetic JPEG height")
    parser.add_argument("--width", type=int, default=500, help="synthetic JPEG width")
    args = parser.parse_args(argv)

    config = data_config_lib.default_data_config()
    config.name = "synthetic"
    config.image_size = args.image_size
    config.augment.randaugment_magnitude = args.randaugment_magnitude
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
        "image_size": args.image_size,
        "randaugment": f"4x{args.randaugment_magnitude}",
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
