"""Signal Propagation Plots (NF-ResNet paper §4; `base.py:signal_metrics`): the statistics against
NumPy and closed forms, the NF-ResNet and BN-ResNet curves at init against their analytic
predictions, and a smoke test of the command.

The model tests use small ResNets (width 2: 128…1024 channels, 3 blocks per stage) at 128 px, so
that each compiles and runs in seconds on a CPU; the tolerances below say what that costs, with
the spread measured over parameter seeds 0–6 (the tests use seed 0).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import signal_propagation as spp_command
from nfnets_jax.analysis import signal_propagation as spp

ALPHA = 0.2  # the NF models' default α
TINY = {"width": 2, "depths": (3, 3, 3, 3)}
RESOLUTION, BATCH = 128, 8  # stage maps 32, 16, 8, 4 px
TRANSITIONS = [0, 3, 6, 9]
WITHIN_STAGE = [i for i in range(12) if i not in TRANSITIONS]  # blocks that add to their input


@pytest.fixture(scope="module")
def images():
    return spp.gaussian_images(BATCH, RESOLUTION, seed=0)


def test_channel_statistics_match_numpy_and_closed_form():
    rng = np.random.default_rng(0)
    # A known array: channel c holds c − s_c and c + s_c in equal numbers, so its mean is c and
    # its (population) variance s_c² exactly.
    scales = np.array([0.5, 1.0, 2.0, 3.0])
    signs = np.stack([rng.permutation(np.repeat([-1.0, 1.0], 15)) for _ in scales], axis=-1)
    known = (np.arange(4.0) + signs * scales).reshape(2, 3, 5, 4)
    squared_mean, variance = spp.channel_statistics(jnp.asarray(known))
    np.testing.assert_allclose(squared_mean, np.mean(np.arange(4.0) ** 2), rtol=1e-6)
    np.testing.assert_allclose(variance, np.mean(scales**2), rtol=1e-6)
    # A random array, against a NumPy re-derivation: per channel over N, H, W, then over C.
    x = rng.normal(size=(3, 6, 5, 7)) * rng.uniform(0.5, 2.0, 7) + rng.normal(size=7)
    per_channel = x.reshape(-1, 7)
    squared_mean, variance = spp.channel_statistics(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(squared_mean, np.mean(per_channel.mean(axis=0) ** 2), rtol=1e-5)
    np.testing.assert_allclose(variance, np.mean(per_channel.var(axis=0)), rtol=1e-5)


def test_with_skip_gains_sets_only_skip_gains():
    params = {"block": {"skip_gain": jnp.zeros(()), "w": jnp.zeros((2, 2))}, "linear": {"b": jnp.zeros(3)}}
    updated = spp.with_skip_gains(params, 1.0)
    assert float(updated["block"]["skip_gain"]) == 1.0
    np.testing.assert_array_equal(updated["block"]["w"], 0.0)
    np.testing.assert_array_equal(updated["linear"]["b"], 0.0)


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_skip_gain_override_equals_nf_resnet_skipinit_knob():
    """Setting the skip gains to 1 after init is the same network as NF-ResNet's documented
    `skipinit_gain=jnp.ones` constructor option (the SPP setting), and differs from SkipInit's 0."""
    images = spp.gaussian_images(2, 32, seed=1)
    tiny = {"width": 0.25, "depths": (1, 2, 1, 1)}
    overridden = spp.measure("nf_resnet50", images, skip_gain=1.0, **tiny)
    knob = spp.measure("nf_resnet50", images, skip_gain=None, skipinit_gain=jnp.ones, **tiny)
    np.testing.assert_allclose(overridden.avg_variance, knob.avg_variance, rtol=1e-5)
    np.testing.assert_allclose(overridden.branch_variance, knob.branch_variance, rtol=1e-5)
    skipinit = spp.measure("nf_resnet50", images, skip_gain=None, **tiny)
    # With SkipInit's zero gain the second block of stage 2 is the identity.
    np.testing.assert_allclose(skipinit.avg_variance[2], skipinit.avg_variance[1], rtol=1e-5)
    assert overridden.avg_variance[2] > overridden.avg_variance[1]


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_nf_resnet_tracks_expected_std_and_resets_at_transitions(images):
    """h_{i+1} = h_i + α·f(h_i/β_i) with a variance-preserving branch: Var(h) = 1 + k·α² after the
    k-th block of a stage (the transition's shortcut restarts at 1), NFNet paper §3.

    Tolerances: at 128 px the last stages' maps are 8×8 and 4×4, where the zero padding of the
    3×3 conv drops up to 5/9 of the taps at border positions and lowers the branch variance
    (measured ~0.7–0.9 there vs ~1 on 32×32 maps); the shortfall carries into the next blocks,
    so the measured curve sits up to ~11% below 1 + k·α² (measured 0.895–1.06 of it; at 224 px
    the full-width ResNet-50 is within 2%). Hence rtol 15%. The increment check is tighter and
    border-independent: Var(h + α·f) − Var(h) = α²·Var(f) when the branch is uncorrelated with
    its input, which at init holds up to a channel-averaged covariance (measured ≤ 0.005,
    against increments of ~0.04).
    """
    result = spp.measure("nf_resnet50", images, **TINY)
    assert not result.is_training  # stateless: inference mode, no stochastic depth
    assert result.transitions == TRANSITIONS
    closed_form = np.array([1.0 + k * ALPHA**2 for depth in TINY["depths"] for k in range(1, depth + 1)])
    np.testing.assert_allclose(result.expected_variance, closed_form, rtol=1e-6)

    np.testing.assert_allclose(result.avg_variance, closed_form, rtol=0.15)
    increments = np.diff(result.avg_variance)
    assert np.all(increments[[i - 1 for i in WITHIN_STAGE]] > 0)  # grows by α² per block …
    assert np.all(increments[[i - 1 for i in TRANSITIONS[1:]]] < 0)  # … and resets at transitions
    np.testing.assert_allclose(
        increments[[i - 1 for i in WITHIN_STAGE]], ALPHA**2 * result.branch_variance[WITHIN_STAGE], atol=0.01
    )
    # Variance-preserving branches where the maps are large (32×32, 16×16; measured 0.89–1.07).
    np.testing.assert_allclose(result.branch_variance[:6], 1.0, atol=0.15)
    # No mean shift: the channel means are at the sampling floor, Var/(N·H·W) up to spatial
    # correlation (≤ 0.02 measured, on the 4×4 maps).
    assert np.max(result.avg_squared_mean) < 0.05


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_bn_resnet_variance_grows_linearly_within_stages_and_resets(images):
    """Pre-activation BN-ReLU ResNet at init, BN on batch statistics: the variance grows linearly
    within a stage and resets at transitions (the NF-ResNet paper's signal propagation plots).

    Closed form: every BN → ReLU → He-init conv produces channels of second moment
    2·E[relu(z)²] = 1, of which the squared channel mean is 2·(E[relu(z)])² = 1/π (the ReLU's
    positive mean times a random weight sum: mean shift), so the variance is 1 − 1/π. The k-th
    block of a stage adds one such branch to the transition's shortcut (itself one such conv),
    so its output variance is (k + 1)·(1 − 1/π). Finite width makes each conv's Σw² differ
    from its expectation by ~sqrt(2/fan_in) per channel (fan-ins of 32–256 here) and leaves
    small correlations between branch and shortcut: measured ≤ 5% off for the branch, ≤ 12%
    for the block outputs (worst in stage 1), hence rtol 10% and 15%.
    """
    result = spp.measure("bn_resnet50", images, **TINY)
    assert result.is_training  # BN state exists, so batch statistics are used
    assert result.expected_variance is None
    assert result.transitions == TRANSITIONS
    per_conv = 1.0 - 1.0 / np.pi
    np.testing.assert_allclose(result.branch_variance, per_conv, rtol=0.10)
    closed_form = np.array([(k + 1) * per_conv for depth in TINY["depths"] for k in range(1, depth + 1)])
    np.testing.assert_allclose(result.avg_variance, closed_form, rtol=0.15)
    for curve in (result.avg_variance, result.avg_squared_mean):
        increments = np.diff(curve)
        assert np.all(increments[[i - 1 for i in WITHIN_STAGE]] > 0)
        assert np.all(increments[[i - 1 for i in TRANSITIONS[1:]]] < 0)
    # Mean shift: ~1/π per conv, orders of magnitude above an NF network's sampling floor.
    assert np.min(result.avg_squared_mean) > 0.2


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_command_writes_png_and_json_smoke(tmp_path, capsys):
    out = tmp_path / "spp"
    summary = spp_command.main(
        [f"--out={out}", "--models=nf_resnet50,bn_resnet50", "--resolution=32", "--batch=2",
         "--width=0.25", "--depths=1,1,1,1"]
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == summary
    png = out / spp_command.PNG_NAME
    assert summary["png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / spp_command.JSON_NAME).read_text())
    assert [r["model"] for r in record["results"]] == ["nf_resnet50", "bn_resnet50"]
    for r in record["results"]:
        assert len(r["avg_variance"]) == len(r["avg_squared_mean"]) == len(r["branch_variance"]) == 4
    assert record["results"][0]["expected_variance"] is not None
    assert record["results"][1]["expected_variance"] is None
    assert set(summary["models"]) == {"nf_resnet50", "bn_resnet50"}
