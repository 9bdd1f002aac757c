"""Signal Propagation Plots: per-block activation statistics of a network at initialisation.

NF-ResNet paper (Brock, De & Smith, ICLR 2021) §4; official `base.py:signal_metrics`. Feed a batch of
N(0, 1) inputs through a freshly initialised network and record, for every residual block:

1. the average channel squared mean of the block output — mean over channels of
   (mean over N, H, W)², a proxy for mean shift; it should stay near 0;
2. the average channel variance of the block output — mean over channels of var over N, H, W;
   in BN pre-activation ResNets it grows linearly within a stage and resets at transitions, in
   NF-ResNets it follows the analytic expected_std² = 1 + k·α² (reset after each transition);
3. the residual branch's average channel variance, before stochastic depth, skip gain and α
   (official `res_avg_var`; the models return it as `branch_variances`); it should be about 1.

`measure` runs one registry model and returns these curves plus, for NF models, the analytic
expected_std² of each block's output that the model's β schedule assumes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import models
from nfnets_jax.models import layers


def channel_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(average channel squared mean, average channel variance) of an NHWC (or any channels-last)
    activation: per channel, the mean and population variance over every other axis (N, H, W),
    then the average over channels (NF-ResNet paper §4, official `base.signal_metrics`).

    Computed in float32 whatever the activation dtype.
    """
    x = jnp.asarray(x, jnp.float32)
    channel_mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
    # The variance is the same statistic the models report for their residual branches.
    return jnp.mean(jnp.square(channel_mean)), layers.channel_variance(x)


def with_skip_gains(params: hk.Params, value: float) -> hk.Params:
    """A copy of `params` with every scalar `skip_gain` (SkipInit, NF-ResNet paper §4) set to `value`.

    The NF models initialise the skip gain to 0, which makes every non-transition block the
    identity at init; the NF-ResNet paper's SPPs use a gain of 1 so that the branches
    contribute and the α/β variance bookkeeping is visible. Setting the parameter after init is
    exactly what NF-ResNet's `skipinit_gain=jnp.ones` constructor knob does (it only chooses
    that parameter's initialiser), and it works for every NF family, including those without
    the knob (NFNet, NF-RegNet). Models without skip gains (BN-ResNet) are returned unchanged.
    """
    return {
        module: {leaf: (jnp.full_like(v, value) if leaf == "skip_gain" else v) for leaf, v in leaves.items()}
        for module, leaves in params.items()
    }


@dataclasses.dataclass(frozen=True)
class SignalPropagation:
    """The three SPP curves of one model, one entry per residual block, in order.

    `stages` is each block's 1-based stage; a block whose stage differs from its predecessor's
    is a transition. `expected_variance` is the NF models' analytic expected_std² of each
    block's output (None for models without a β schedule, e.g. BN-ResNets). `is_training`
    records the mode the forward pass ran in (training mode = BN batch statistics).
    """

    model: str
    stages: tuple[int, ...]
    avg_squared_mean: np.ndarray
    avg_variance: np.ndarray
    branch_variance: np.ndarray
    expected_variance: np.ndarray | None
    is_training: bool

    @property
    def transitions(self) -> list[int]:
        """0-based indices of the first block of each stage."""
        return [i for i, stage in enumerate(self.stages) if i == 0 or stage != self.stages[i - 1]]

    def to_json(self) -> dict[str, Any]:
        """Plain-Python record (lists of floats) for a JSON file."""
        return {
            "model": self.model,
            "is_training": self.is_training,
            "stages": list(self.stages),
            "transitions": self.transitions,
            "avg_squared_mean": [float(v) for v in self.avg_squared_mean],
            "avg_variance": [float(v) for v in self.avg_variance],
            "branch_variance": [float(v) for v in self.branch_variance],
            "expected_variance": (
                None if self.expected_variance is None else [float(v) for v in self.expected_variance]
            ),
        }


def gaussian_images(batch: int, resolution: int, seed: int = 0) -> jax.Array:
    """The SPP input: a [batch, resolution, resolution, 3] batch of N(0, 1) pixels (NHWC)."""
    if batch < 2 or resolution < 1:
        raise ValueError(
            f"Signal propagation needs a batch of at least 2 (per-channel variance over N, H, W; "
            f"BN needs batch statistics) and a positive resolution; got batch={batch}, "
            f"resolution={resolution}."
        )
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, resolution, resolution, 3), jnp.float32)


def smooth_images(batch: int, resolution: int, seed: int = 0, correlation_px: float = 4.0) -> jax.Array:
    """An image-like SPP input: N(0, 1) noise blurred with a Gaussian of std `correlation_px`
    pixels (periodic, in Fourier space), then normalised to mean 0 and variance 1 per channel
    over (N, H, W), like a standardised natural image.

    Why: NFNets and NF-RegNets average-pool the shortcut of their strided transitions, which
    divides the variance of white noise by 4 (neighbouring pixels are independent) but keeps
    most of the variance of a spatially correlated signal, as real images are. With white noise
    their SPPs fall far below expected_std² after every stride; with this probe they should not.
    """
    if batch < 2 or resolution < 1 or not correlation_px > 0:
        raise ValueError(
            f"smooth_images needs batch >= 2, resolution >= 1 and correlation_px > 0; got batch={batch}, "
            f"resolution={resolution}, correlation_px={correlation_px}."
        )
    noise = jax.random.normal(jax.random.PRNGKey(seed), (batch, resolution, resolution, 3), jnp.float32)
    frequencies = jnp.fft.fftfreq(resolution)  # cycles per pixel
    squared = frequencies[:, None] ** 2 + frequencies[None, :] ** 2
    # The Fourier transform of a Gaussian of std σ px is exp(−2π²σ²f²).
    transfer = jnp.exp(-2.0 * (jnp.pi * correlation_px) ** 2 * squared)[None, :, :, None]
    smooth = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(noise, axes=(1, 2)) * transfer, axes=(1, 2)))
    mean = jnp.mean(smooth, axis=(0, 1, 2), keepdims=True)
    std = jnp.std(smooth, axis=(0, 1, 2), keepdims=True)
    return ((smooth - mean) / std).astype(jnp.float32)


PROBES = {"gaussian": gaussian_images, "smooth": smooth_images}  # name -> f(batch, resolution, seed)


def measure(
    name: str,
    images: jax.Array,
    *,
    skip_gain: float | None = 1.0,
    seed: int = 0,
    **model_kwargs: Any,
) -> SignalPropagation:
    """SPP statistics of registry model `name` at initialisation on `images` (NHWC); see
    `measure_probes`, which this is for one batch."""
    return measure_probes(name, {"images": images}, skip_gain=skip_gain, seed=seed, **model_kwargs)["images"]


def measure_probes(
    name: str,
    probes: dict[str, jax.Array],
    *,
    skip_gain: float | None = 1.0,
    seed: int = 0,
    **model_kwargs: Any,
) -> dict[str, SignalPropagation]:
    """SPP statistics of registry model `name` at initialisation on each batch of `probes`
    (label -> NHWC images, all of one shape), from one compiled program (compiling it is most of
    the cost; the same `seed` gives every probe the same parameters).

    Models with normalisation state (BN-ResNets) run in training mode, so BN uses the batch's
    statistics, as in the paper's plots; stateless models (every NF model) run in inference
    mode, so stochastic depth drops no branch (NF models have no batch dependence otherwise).
    `skip_gain` sets every NF skip gain after init (see `with_skip_gains`; None keeps the
    model's own init, i.e. SkipInit zeros). `seed` picks the parameter initialisation;
    `model_kwargs` go to `models.create` (e.g. `width`, `depths`, `alpha`, `activation`).
    """
    images = next(iter(probes.values()))  # the shape the program is compiled for
    metadata: dict[str, Any] = {}

    def block_statistics(x: jax.Array, is_training: bool) -> dict[str, jax.Array]:
        model = models.create(name, num_classes=10, **model_kwargs)
        # Static facts of the built model, recorded while tracing (no arrays involved).
        metadata["stages"] = tuple(int(block.stage) for block in model.blocks)
        schedule = getattr(model, "schedule", None)
        metadata["expected_variance"] = (
            None if schedule is None else np.array([block.expected_std**2 for block in schedule])
        )
        features = model(x, is_training, return_features=True)
        squared_means, variances = zip(*(channel_statistics(out) for out in features["block_outputs"]))
        return {
            "avg_squared_mean": jnp.stack(squared_means),
            "avg_variance": jnp.stack(variances),
            "branch_variance": jnp.stack([jnp.asarray(v, jnp.float32) for v in features["branch_variances"]]),
        }

    forward = hk.transform_with_state(block_statistics)
    key = jax.random.PRNGKey(seed)
    _, state_shapes = jax.eval_shape(lambda rng, x: forward.init(rng, x, False), key, images)
    is_training = bool(state_shapes)

    def init_and_measure(rng: jax.Array, x: jax.Array) -> dict[str, jax.Array]:
        # One compiled program: the init's own forward pass is dead code once its outputs are
        # dropped, so XLA removes it and the network is only computed once.
        params, state = forward.init(rng, x, False)
        if skip_gain is not None:
            params = with_skip_gains(params, skip_gain)
        statistics, _ = forward.apply(params, state, rng, x, is_training)
        return statistics

    lowered = jax.jit(init_and_measure).lower(key, images)
    # The program runs once per probe, so compile time dominates: on CPU, LLVM's optimisations
    # of the dozens of unrolled threefry generators (one per parameter) cost ~3× the compile time
    # and gain nothing measurable (the convolutions are library calls either way).
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    compiled = lowered.compile(compiler_options=options)
    results = {}
    for label, probe in probes.items():
        if probe.shape != images.shape or probe.dtype != images.dtype:
            raise ValueError(f"Probe {label!r} is {probe.dtype}{list(probe.shape)}; every probe must be "
                             f"{images.dtype}{list(images.shape)} like the first (one compiled program).")
        statistics = jax.device_get(compiled(key, probe))
        results[label] = SignalPropagation(
            model=name,
            stages=metadata["stages"],
            avg_squared_mean=np.asarray(statistics["avg_squared_mean"]),
            avg_variance=np.asarray(statistics["avg_variance"]),
            branch_variance=np.asarray(statistics["branch_variance"]),
            expected_variance=metadata["expected_variance"],
            is_training=is_training,
        )
    return results
