"""Forward, dX and dW of one conv, XLA's native op against the CPU path (per-group split; 1×1 as a matmul).

The micro-benchmark of docs/official_code_notes.md, which found XLA:CPU's grouped-conv weight
gradient to be the bottleneck of an NFNet training step. Each shape is (batch, size, channels,
groups, stride); the defaults are F0's two grouped shapes at 192 px. Prints one JSON line per
(shape, implementation, pass) with the median over `--repeats` calls and the load average.

    python -m benchmarks.grouped_conv_grads
    python -m benchmarks.grouped_conv_grads --shape=8,12,768,6,1 --shape=8,14,224,28,1
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
from absl import flags

from benchmarks.train_step_latency import loadavg
from experiments import command_line
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


def parse_shape(spec: str) -> tuple[int, int, int, int, int, int, int]:
    """(batch, size, channels, groups, stride, kernel, out_channels) of a `--shape` value
    `batch,size,channels,groups,stride[,kernel[,out_channels]]` (kernel 3, out_channels = channels
    by default); ValueError saying what is wrong."""
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        values = []
    if not 5 <= len(values) <= 7 or min(values) < 1:
        raise ValueError(f"--shape={spec}: want 5 to 7 positive integers, "
                         "batch,size,channels,groups,stride[,kernel[,out_channels]] (e.g. 8,12,768,6,1).")
    batch, size, channels, groups, stride, *rest = values
    kernel = rest[0] if rest else 3
    out_channels = rest[1] if len(rest) > 1 else channels
    if channels % groups or out_channels % groups:
        raise ValueError(f"--shape={spec}: {groups} groups do not divide {channels} input and {out_channels} "
                         "output channels.")
    return batch, size, channels, groups, stride, kernel, out_channels


FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_multi_string("shape", DEFAULT_SHAPES, "batch,size,channels,groups,stride[,kernel[,out_channels]] "
                          "(repeatable; kernel 3, out_channels = channels by default).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 7, "Timed calls per pass, after one warm-up.", lower_bound=1, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False, positional=False)
    args = FLAGS
    try:
        shapes = {spec: parse_shape(spec) for spec in args.shape}
    except ValueError as error:
        command_line.fail(error)
    host_memory.keep_freed_memory()  # as the runner does on a CPU host (nfnets_jax/runtime/host_memory.py)
    for spec, (batch, size, channels, groups, stride, kernel_size, out_channels) in shapes.items():
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
