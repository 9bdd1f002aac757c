"""Forward, dX and dW of one conv, XLA's native op against the CPU path (per-group split; 1×1 as a matmul).

The micro-benchmark of docs/official_code_notes.md, which found XLA:CPU's grouped-conv weight
gradient to be the bottleneck of an NFNet training step. Each shape is (batch, size, channels,
groups, stride); the defaults are F0's two grouped shapes at 192 px. Prints one JSON line per
(shape, implementation, pass) with the median over `--repeats` calls and the load average.

    python -m benchmarks.grouped_conv_grads
    python -m benchmarks.grouped_conv_grads --shape 8,12,768,6,1 --shape 8,14,224,28,1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from benchmarks.train_step_latency import loadavg
from nfnets_jax.runtime import host_memory, provenance
from nfnets_jax.models import grouped_conv

# F0 at 192 px: its two grouped 3×3 shapes, and a stage-2 1×1 conv (24×24, 512 → 128 channels).
DEFAULT_SHAPES = ["8,12,768,6,1", "8,24,256,2,1", "8,24,512,1,1,1,128"]


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # Compile + warm-up.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append",
                        help="batch,size,channels,groups,stride[,kernel[,out_channels]] (repeatable; kernel 3, "
                             "out_channels = channels by default)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    host_memory.keep_freed_memory()  # as the runner does on a CPU host (nfnets_jax/runtime/host_memory.py)
    for spec in args.shape or DEFAULT_SHAPES:
        batch, size, channels, groups, stride, *rest = (int(v) for v in spec.split(","))
        kernel_size = rest[0] if rest else 3
        out_channels = rest[1] if len(rest) > 1 else channels
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(keys[0], (batch, size, size, channels))
        kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, channels // groups, out_channels))
        out_size = -(-size // stride)
        cotangent = jax.random.normal(keys[2], (batch, out_size, out_size, out_channels))
        for impl in ("xla", "split"):

            def conv(a, w, impl=impl):
                return grouped_conv.conv2d_same(a, w, stride, groups, impl)

            passes = {
                "forward": jax.jit(conv),
                "dX": jax.jit(lambda a, w, conv=conv: jax.vjp(lambda a_: conv(a_, w), a)[1](cotangent)[0]),
                "dW": jax.jit(lambda a, w, conv=conv: jax.vjp(lambda w_: conv(a, w_), w)[1](cotangent)[0]),
            }
            for name, fn in passes.items():
                record = {
                    "shape": spec,
                    "impl": impl,
                    "pass": name,
                    "median_ms": round(_median_ms(fn, (x, kernel), args.repeats), 2),
                    "loadavg": loadavg(),
                    "provenance": provenance.collect(),
                }
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
