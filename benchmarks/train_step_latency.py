"""Latency of one training step (forward + backward) and of one eval forward pass.

The setup of docs/official_code_notes.md, where DeepMind's own F0 was timed on this 2-core CPU box:
`jax.jit(jax.value_and_grad(loss))` with `is_training=True` (dropout and stochastic depth on),
softmax cross-entropy on one-hot labels, float32, batch 8 at 192 px; timed after compilation and
one warm-up call, median of `--steps` calls. The eval forward (`is_training=False`) is timed the
same way. Prints one JSON line; with the reference setup it includes the official code's
0.63 images/s and our speed-up over it.

    python -m benchmarks.train_step_latency                              # F0, grouped convs "auto"
    python -m benchmarks.train_step_latency --grouped_conv_impl=xla      # the official op
    python -m benchmarks.train_step_latency --model nfnet_f0 --batch 8 --res 192 --steps 3

On a shared machine, read `loadavg` (1-, 5-, 15-minute load at the end of the run): with 2 cores,
a load above ~2 means other work shared the CPU and the times are inflated.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from absl import flags

from experiments import command_line
from nfnets_jax.runtime import host_memory, provenance
from nfnets_jax import losses, models
from nfnets_jax.models import grouped_conv

# docs/official_code_notes.md, idle machine: DeepMind's F0 on XLA:CPU, jax 0.10.2, 2 cores.
REFERENCE = {
    "setup": {"model": "nfnet_f0", "batch": 8, "res": 192, "dtype": "float32"},
    "images_per_s": 0.63,
    "median_s": 12.64,
    "forward_median_s": 1.75,
}


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def _median_seconds(fn: Callable[[], Any], steps: int) -> tuple[float, list[float]]:
    """Median wall time of `steps` calls of `fn` (which must block until its result is ready)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(
    model: str, batch: int, res: int, steps: int, impl: str, dtype: str = "float32", num_classes: int = 1000
) -> dict[str, Any]:
    """Times the train step and the eval forward of `model`; returns the JSON record."""
    compute_dtype = jnp.dtype(dtype)
    # Only the NFNet and NF-RegNet families have grouped convs (and the option); "auto" is their default.
    options = {} if impl == "auto" else {"grouped_conv_impl": impl}
    forward = hk.transform_with_state(
        lambda x, is_training: models.create(model, num_classes, **options)(x, is_training)
    )
    rng = jax.random.PRNGKey(0)
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, res, res, 3), compute_dtype)
    targets = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, num_classes), num_classes)
    params, state = jax.jit(forward.init, static_argnums=2)(rng, images, True)
    params = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)

    def loss(params: hk.Params, x: jax.Array) -> jax.Array:
        logits, _ = forward.apply(params, state, rng, x, True)
        return jnp.mean(losses.softmax_cross_entropy(logits, targets))

    train_step = jax.jit(jax.value_and_grad(loss))
    eval_forward = jax.jit(lambda params, x: forward.apply(params, state, None, x, False)[0])

    start = time.perf_counter()
    jax.block_until_ready(train_step(params, images))
    compile_s = time.perf_counter() - start
    jax.block_until_ready(train_step(params, images))  # Warm-up.
    median_s, times = _median_seconds(lambda: jax.block_until_ready(train_step(params, images)), steps)

    jax.block_until_ready(eval_forward(params, images))  # Compile.
    jax.block_until_ready(eval_forward(params, images))  # Warm-up.
    forward_median_s, _ = _median_seconds(lambda: jax.block_until_ready(eval_forward(params, images)), steps)

    record: dict[str, Any] = {
        "model": model,
        "batch": batch,
        "res": res,
        "dtype": dtype,
        "grouped_conv_impl": impl,
        "steps": steps,
        "median_s": round(median_s, 4),
        "step_times_s": [round(t, 4) for t in times],
        "images_per_s": round(batch / median_s, 4),
        "forward_median_s": round(forward_median_s, 4),
        "forward_images_per_s": round(batch / forward_median_s, 4),
        "compile_s": round(compile_s, 2),
        "loadavg": loadavg(),
        "provenance": provenance.collect(),  # versions, commit, machine, devices
        "reference_images_per_s": REFERENCE["images_per_s"],
        "reference_source": "docs/official_code_notes.md (DeepMind F0, idle 2-core CPU)",
    }
    same_setup = REFERENCE["setup"] == {"model": model, "batch": batch, "res": res, "dtype": dtype}
    record["speedup_vs_reference"] = round(record["images_per_s"] / REFERENCE["images_per_s"], 2) if same_setup else None
    return record


FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_string("model", "nfnet_f0", "Any name of nfnets_jax.models.list_models().", flag_values=FLAGS)
flags.DEFINE_integer("batch", 8, "Images per step.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("res", 192, "Image height = width, pixels.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "Timed calls after compile + 1 warm-up.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params and images in this dtype.", flag_values=FLAGS)
flags.DEFINE_integer("num_classes", 1000, "Classes of the model's head.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("grouped_conv_impl", "auto", list(grouped_conv.GROUPED_CONV_IMPLS), "How grouped convs are "
                  "computed (nfnets_jax/models/grouped_conv.py).", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False, positional=False)
    args = FLAGS
    if args.model not in models.list_models():
        command_line.fail(f"--model={args.model} is not a model of nfnets_jax.models; e.g. nfnet_f0, nf_resnet50 "
                          "(nfnets_jax.models.list_models() lists them).")
    if args.grouped_conv_impl != "auto" and not args.model.startswith(("nfnet", "nf_regnet")):
        command_line.fail(f"--grouped_conv_impl={args.grouped_conv_impl}: {args.model} has no grouped convolutions "
                          "(only the NFNets and NF-RegNets do); leave the flag out.")
    host_memory.keep_freed_memory()  # as the runner does on a CPU host (nfnets_jax/runtime/host_memory.py)
    print(
        json.dumps(
            measure(args.model, args.batch, args.res, args.steps, args.grouped_conv_impl, args.dtype, args.num_classes)
        ),
        flush=True,
    )

if __name__ == "__main__":
    main()
