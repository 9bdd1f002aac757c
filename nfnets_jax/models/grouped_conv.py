"""The grouped convolution of NFNet/NF-RegNet blocks, in two interchangeable implementations.

Why two: XLA:CPU lowers a grouped convolution's **weight gradient** to a `batch_group_count`
convolution that runs 10–1000× slower than the same arithmetic done as dense convolutions
(docs/official_code_notes.md: 12×12, 768 ch, 6 groups, batch 8 — forward 72 ms, dW 1009 ms; a dense
conv with 6× the MACs has dW 251 ms). It makes a CPU training step of F0 cost ~8.6× its forward.
The forward and input gradient of a grouped conv are also 2–4× slower on XLA:CPU than the same
work as per-group dense convs (`python -m benchmarks.grouped_conv_grads`). GPU and TPU compilers
handle grouped convolutions natively and well, so there we keep XLA's op.

- `"xla"`: one `conv_general_dilated` with `feature_group_count` (the official code's op).
- `"split"`: the same convolution written as one dense convolution per group, on the group's
  slice of input channels and output channels, concatenated along channels. That is the
  definition of a grouped convolution, so the result is the same; on XLA:CPU the forward came
  out bit-identical on the shapes we checked (F0's included) and gradients agree to float
  rounding (tests/test_grouped_conv.py). Plain autodiff then differentiates dense convs, whose
  weight gradient XLA:CPU handles well; no custom gradient is involved, so jit, vmap, pmap, jvp
  and higher derivatives all just work.
  On this path a 1×1 convolution (dense or grouped) is also written as the matrix product it is
  (`_pointwise_as_matmul`): XLA:CPU turns a 1×1 conv's weight gradient into a convolution over
  the whole activation map that takes 13–20× its forward (F0 stage 2, 512→128 channels: dW 1.96 s
  against 0.14 s as a matrix product, `python -m benchmarks.grouped_conv_grads --shape
  8,24,512,1,1,1,128`).
- `"auto"` (default): chosen for the platform the computation is compiled for, when it is
  lowered (`jax.lax.platform_dependent`), not for the backend this process happens to run on:
  on the CPU `"split"` for convs of at most `AUTO_SPLIT_MAX_GROUPS` groups (and 1×1 convs as
  matrix products), `"xla"` otherwise; on GPU and TPU always `"xla"`. The cap is there because
  the split graph holds one dense conv per group: NFNets have 1–8 groups of 128 channels and
  split cheaply, but NF-RegNets have dozens of groups of 8 (B0: 4–92), and splitting those makes
  compilation ~6× slower (B0 forward: 21 s instead of 3 s of CPU; its training step at batch 2,
  64 px: 137 s instead of 24 s wall on a loaded box) for a step that is ~9× faster, which pays
  off only over long runs: ask for `"split"` explicitly then. On a TPU the split layout costs
  memory traffic instead: XLA:TPU's F0 train step, compiled with the CPU's choices, reads and
  writes ~0.8 GB more per step than with XLA's own convs (docs/tpu_step_cost_log.md). So a step
  compiled for a TPU from a CPU host (`experiments.memory_plan --target`,
  `benchmarks.tpu_step_estimate`) gets the TPU's choice. Either choice gives the same numbers;
  only speed differs.

Dense 3×3 convolutions take the same path under every implementation; dense 1×1 convolutions are
matrix products under `"split"` (so on the CPU by default) and XLA convolutions under `"xla"`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

GroupedConvImpl = Literal["auto", "xla", "split"]
GROUPED_CONV_IMPLS: tuple[str, ...] = ("auto", "xla", "split")

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# "auto" splits convs with at most this many groups (module doc: compile time grows per group).
AUTO_SPLIT_MAX_GROUPS = 16


def check_impl(impl: str) -> None:
    """Rejects an unknown implementation name with the list of valid ones."""
    if impl not in GROUPED_CONV_IMPLS:
        raise ValueError(f"Unknown grouped_conv_impl {impl!r}; choose one of {list(GROUPED_CONV_IMPLS)}.")


def resolve_impl(impl: str, feature_group_count: int, platform: str) -> str:
    """`"xla"` or `"split"` for `impl` on `platform` (a lowering platform: "cpu", "tpu", "cuda",
    ...); `"auto"` picks `"split"` on the CPU for convs of at most `AUTO_SPLIT_MAX_GROUPS` groups,
    else `"xla"` (see module doc)."""
    check_impl(impl)
    if impl == "auto":
        return "split" if platform == "cpu" and feature_group_count <= AUTO_SPLIT_MAX_GROUPS else "xla"
    return impl


def conv2d_same(
    x: jax.Array, kernel: jax.Array, stride: int, feature_group_count: int = 1, impl: str = "auto"
) -> jax.Array:
    """NHWC × HWIO → NHWC convolution with TensorFlow `SAME` padding and `feature_group_count` groups.

    `kernel` is (kh, kw, in_ch // groups, out_ch); output channels [g·out_ch/groups, (g+1)·out_ch/groups)
    see input channels [g·in_ch/groups, (g+1)·in_ch/groups) only. `impl` picks how a grouped
    conv is computed (module doc); it never changes what is computed. With `"auto"` the choice is
    the lowering platform's: where the CPU's and the others' differ, both are traced and only the
    one of the platform the program is compiled for is lowered.
    """
    check_impl(impl)
    if impl == "auto":
        on_cpu = resolve_impl(impl, feature_group_count, "cpu")
        elsewhere = resolve_impl(impl, feature_group_count, "tpu")
        if _computes_alike(on_cpu, elsewhere, kernel, feature_group_count):
            return conv2d_same(x, kernel, stride, feature_group_count, elsewhere)
        return jax.lax.platform_dependent(
            x, kernel,
            cpu=lambda a, w: conv2d_same(a, w, stride, feature_group_count, on_cpu),
            default=lambda a, w: conv2d_same(a, w, stride, feature_group_count, elsewhere))

    def dense(inputs: jax.Array, weights: jax.Array, groups: int = 1) -> jax.Array:
        return jax.lax.conv_general_dilated(
            inputs,
            weights,
            window_strides=(stride, stride),
            padding="SAME",
            dimension_numbers=_DIMENSION_NUMBERS,
            feature_group_count=groups,
        )

    if impl == "split" and kernel.shape[:2] == (1, 1):
        return _pointwise_as_matmul(x, kernel, stride, feature_group_count)
    if feature_group_count == 1 or impl == "xla":
        return dense(x, kernel, feature_group_count)
    in_per_group = kernel.shape[2]
    out_per_group = kernel.shape[3] // feature_group_count
    if x.shape[-1] != in_per_group * feature_group_count or kernel.shape[3] % feature_group_count:
        raise ValueError(
            f"A {feature_group_count}-group conv needs in_ch = {feature_group_count}·{in_per_group} and "
            f"out_ch divisible by {feature_group_count}; got input {tuple(x.shape)}, kernel {tuple(kernel.shape)}."
        )
    outputs = [
        dense(
            x[..., g * in_per_group : (g + 1) * in_per_group],
            kernel[..., g * out_per_group : (g + 1) * out_per_group],
        )
        for g in range(feature_group_count)
    ]
    return jnp.concatenate(outputs, axis=-1)


def _computes_alike(impl_a: str, impl_b: str, kernel: jax.Array, feature_group_count: int) -> bool:
    """Whether two implementations build the same program for this conv: the same name, or a
    dense conv wider than 1×1, which every implementation computes as one XLA convolution."""
    dense_spatial = feature_group_count == 1 and kernel.shape[:2] != (1, 1)
    return impl_a == impl_b or dense_spatial


def _pointwise_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, feature_group_count: int) -> jax.Array:
    """A 1×1 convolution written as the matrix product it is (per group), for the `"split"` path.

    XLA:CPU differentiates a 1×1 `conv_general_dilated` into a weight-gradient convolution whose
    window is the whole activation map, which runs 13–20× slower than its forward; as a `dot_general`
    the weight gradient is one more matrix product (`python -m benchmarks.grouped_conv_grads`).
    A 1×1 kernel with TensorFlow `SAME` padding never pads, so a stride only subsamples the input.
    """
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    in_per_group = kernel.shape[2]
    if x.shape[-1] != in_per_group * feature_group_count or kernel.shape[3] % feature_group_count:
        raise ValueError(
            f"A {feature_group_count}-group conv needs in_ch = {feature_group_count}·{in_per_group} and "
            f"out_ch divisible by {feature_group_count}; got input {tuple(x.shape)}, kernel {tuple(kernel.shape)}."
        )
    weights = kernel[0, 0]
    if feature_group_count == 1:
        return jnp.einsum("nhwi,io->nhwo", x, weights)
    grouped_x = x.reshape(*x.shape[:-1], feature_group_count, in_per_group)
    grouped_w = weights.reshape(in_per_group, feature_group_count, -1)
    out = jnp.einsum("nhwgi,igo->nhwgo", grouped_x, grouped_w)
    return out.reshape(*out.shape[:-2], -1)
