"""`python -m experiments.reproduce --quick`: every claim's machinery end to end at tiny sizes
(JSON, figures and the generated page), plus the pieces it is built from against independent
expectations: the image-like SPP probe's statistics, and AGC with a traced λ against AGC with the same λ as a number."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import reproduce
from nfnets_jax.analysis import signal_propagation as spp
from nfnets_jax.optim import agc


def test_smooth_probe_is_standardised_and_spatially_correlated():
    images = np.asarray(spp.smooth_images(4, 32, seed=0, correlation_px=3.0))
    assert images.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, rtol=1e-4)
    neighbour = np.mean(images[:, :, 1:] * images[:, :, :-1])  # lag-1 autocorrelation
    # A Gaussian blur of σ px turns white noise into a field with correlation exp(−d²/(4σ²)).
    assert neighbour == pytest.approx(math.exp(-1 / (4 * 3.0**2)), abs=0.03)
    white = np.asarray(spp.gaussian_images(4, 32, seed=0))
    assert abs(np.mean(white[:, :, 1:] * white[:, :, :-1])) < 0.03


def test_agc_with_a_traced_clipping_matches_a_number_and_inf_is_no_clipping():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
    grads = {"w": jnp.full((3, 4), 0.5), "b": jnp.full((4,), 0.01)}
    as_number, _ = agc.adaptive_grad_clip(0.1).update(grads, agc.adaptive_grad_clip(0.1).init(params), params)

    def traced(clipping):
        transform = agc.adaptive_grad_clip(clipping)
        return transform.update(grads, transform.init(params), params)[0]

    jax.tree.map(np.testing.assert_allclose, jax.jit(traced)(jnp.float32(0.1)), as_number)
    jax.tree.map(np.testing.assert_allclose, jax.jit(traced)(jnp.float32(jnp.inf)), grads)


@pytest.mark.slow
def test_quick_mode_writes_every_claim_and_the_page(tmp_path):
    out = str(tmp_path / "repro")
    summary = reproduce.main(["--quick", "--out", out])
    assert set(summary["json"]) == set(reproduce.CLAIMS)
    for claim, path in summary["json"].items():
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        assert record["quick"] and record["versions"]["jax"] == jax.__version__
        for figure in record["figures"]:
            assert os.path.getsize(os.path.join(out, os.path.basename(figure))) > 1000
    with open(os.path.join(out, "agc.json"), encoding="utf-8") as f:
        agc_record = json.load(f)
    # 2 batches × (no AGC + 1 λ + BN) × 1 seed, each a finished run with a test accuracy.
    assert len(agc_record["runs"]) == 6
    assert all(0.0 <= run["test_acc"] <= 1.0 for run in agc_record["runs"])
    page = open(summary["doc"], encoding="utf-8").read()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in page
    assert "--quick" in page


def test_unknown_claim_is_rejected_before_any_work(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--only", "agc,speed"])
    assert "--only takes" in capsys.readouterr().err
