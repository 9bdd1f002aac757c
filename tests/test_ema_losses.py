"""EMA with the TF1 warmup (official `utils.py:tf1_ema`) and the label-smoothed soft-label loss."""

import numpy as np
import pytest

import jax.numpy as jnp

from nfnets_jax import losses
from nfnets_jax.optim import ema


@pytest.mark.parametrize("step", [0, 1, 9, 100, 112601, 899990, 10**7])
def test_tf1_decay_matches_formula(step):
    expected = min(0.99999, (1 + step) / (10 + step))
    np.testing.assert_allclose(float(ema.tf1_decay(step, 0.99999)), expected, rtol=1e-6)


def test_cap_governs_the_imagenet_run():
    """At the last of 112,602 steps the decay is still (1+t)/(10+t) ≈ 0.99992, not 0.99999."""
    np.testing.assert_allclose(float(ema.tf1_decay(112601, 0.99999)), 112602 / 112611, rtol=1e-7)


def test_ema_update_matches_numpy_over_three_steps():
    rng = np.random.default_rng(0)
    initial = {"m": {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}}
    trajectory = [
        {"m": {k: rng.normal(size=v.shape).astype(np.float32) for k, v in initial["m"].items()}} for _ in range(3)
    ]
    average = {"m": {k: jnp.asarray(v) for k, v in initial["m"].items()}}
    expected = {k: v.astype(np.float64) for k, v in initial["m"].items()}
    for step, params in enumerate(trajectory):
        average = ema.ema_update(average, params, step, 0.99999)
        decay = min(0.99999, (1 + step) / (10 + step))
        expected = {k: decay * expected[k] + (1 - decay) * params["m"][k] for k in expected}
    for key in expected:
        np.testing.assert_allclose(average["m"][key], expected[key], rtol=1e-6, atol=1e-7)


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="ema_decay=None"):
        ema.ema_update({"w": jnp.ones(1)}, {"w": jnp.ones(1)}, 0, 1.0)


def _numpy_loss(logits, targets, smoothing):
    logits = np.asarray(logits, np.float64)
    targets = (1 - smoothing) * np.asarray(targets, np.float64) + smoothing / logits.shape[-1]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -(targets * log_probs).sum(-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_on_mixed_labels_matches_numpy(smoothing):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 5)).astype(np.float32) * 3
    labels, mix_labels = np.array([0, 1, 2, 3]), np.array([4, 1, 0, 2])
    ratio = np.array([1.0, 0.3, 0.5, 0.9], np.float32)
    targets = losses.mixed_targets(labels, mix_labels, ratio, 5)
    expected_targets = np.zeros((4, 5))
    for i in range(4):
        expected_targets[i, labels[i]] += ratio[i]
        expected_targets[i, mix_labels[i]] += 1 - ratio[i]
    np.testing.assert_allclose(targets, expected_targets, rtol=1e-6)
    loss = losses.softmax_cross_entropy(logits, targets, label_smoothing=smoothing)
    assert loss.shape == (4,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, _numpy_loss(logits, expected_targets, smoothing), rtol=1e-5)


def test_uniform_logits_give_log_num_classes_and_bf16_logits_are_upcast():
    targets = losses.mixed_targets(np.array([3, 7]), np.array([3, 7]), np.ones(2), 1000)
    loss = losses.softmax_cross_entropy(jnp.zeros((2, 1000), jnp.bfloat16), targets, label_smoothing=0.1)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np.log(1000.0), rtol=1e-6)  # official test.py: 6.9077516

    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 1000)) * 4, jnp.bfloat16)
    loss = losses.softmax_cross_entropy(logits, targets, label_smoothing=0.1)
    # float32 arithmetic on the bf16 values; a bf16 softmax would be off by ~1e-2.
    np.testing.assert_allclose(loss, _numpy_loss(np.asarray(logits, np.float32), targets, 0.1), rtol=1e-5)


def test_loss_errors():
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), label_smoothing=1.0)
    with pytest.raises(ValueError, match="mixed_targets"):
        losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,)))
