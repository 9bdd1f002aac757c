"""Inference with kernels standardised once gives the model's own outputs (models/standardized_inference.py)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import standardized_inference as si
from nfnets_jax.models import make_forward
from tests.test_layers import numpy_standardize
from tests.test_nfnet import TINY

# Tiny members of the three families built on WSConv2D: the NFNet has grouped convs and SE.
MODELS = [
    ("nfnet_f0", dict(TINY)),
    ("nf_resnet50", dict(width=1)),
    ("nf_regnet_b0", dict(width=0.25)) ,
]


def _init(name, kwargs, size=32):
    forward = make_forward(name, 10, kwargs)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))
    params, state = jax.jit(lambda: forward.init(jax.random.PRNGKey(0), images, is_training=True))()
    # Non-trivial gains, so that the kernels depend on them.
    params = {m: {k: (v * 1.5 + 0.1 if k == "gain" else v) for k, v in d.items()} for m, d in params.items()}
    return forward, params, state, images


@pytest.mark.parametrize("name,kwargs", MODELS, ids=[m for m, _ in MODELS])
def test_kernels_are_the_standardised_weights_and_the_logits_are_the_models(name, kwargs):
    forward, params, state, images = _init(name, kwargs)
    kernels = si.standardized_kernels_fn(forward)(params, state)
    # One kernel per weight-standardised conv (the modules with a gain), each paper eq. 1 in NumPy.
    assert set(kernels) == {m for m, d in params.items() if "gain" in d}
    for module, kernel in kernels.items():
        expected = numpy_standardize(np.asarray(params[module]["w"], np.float64),
                                     np.asarray(params[module]["gain"], np.float64))
        np.testing.assert_allclose(np.asarray(kernel), expected, rtol=1e-5, atol=1e-6)
    reference, _ = jax.jit(lambda p, s, x: forward.apply(p, s, None, x, is_training=False))(params, state, images)
    logits, _ = jax.jit(lambda p, s, k, x: si.apply_with_kernels(forward, p, s, k, x))(params, state, kernels, images)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-5, atol=1e-6)


def test_kernels_follow_the_compute_dtype_and_must_match_the_model():
    forward, params, state, images = _init(*MODELS[0])
    kernels = si.standardized_kernels_fn(forward)(params, state)
    # Kernels of the bfloat16 weights a bfloat16 eval applies: that eval's own logits.
    half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    half_kernels = si.standardized_kernels_fn(forward)(half, state)
    assert all(k.dtype == jnp.bfloat16 for k in half_kernels.values())
    apply = jax.jit(lambda p, s, k, x: si.apply_with_kernels(forward, p, s, k, x)[0])
    reference, _ = jax.jit(lambda p, s, x: forward.apply(p, s, None, x, is_training=False))(
        half, state, images.astype(jnp.bfloat16))
    logits = apply(half, state, half_kernels, images.astype(jnp.bfloat16))
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(logits, np.float32), np.asarray(reference, np.float32))
    # float32 kernels are cast to the conv's dtype, as the module's own output would be.
    assert apply(half, state, kernels, images.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    other = make_forward("nf_resnet50", 10, dict(width=1))
    other_params, other_state = jax.jit(lambda: other.init(jax.random.PRNGKey(0), images, is_training=True))()
    with pytest.raises(KeyError, match="computed for another model"):
        si.apply_with_kernels(other, other_params, other_state, kernels, images)
    # Same module names, another width: each kernel's shape is checked against the conv's.
    wider = make_forward("nfnet_f0", 10, dict(TINY, widths=(32, 64, 128, 128)))
    wide_params, wide_state = jax.jit(lambda: wider.init(jax.random.PRNGKey(0), images, is_training=True))()
    with pytest.raises(ValueError, match="has shape .* this model's conv needs"):
        si.apply_with_kernels(wider, wide_params, wide_state, kernels, images)


def test_a_model_without_weight_standardisation_is_told_so():
    forward = hk.transform_with_state(lambda x, is_training: hk.Linear(3)(x.reshape(x.shape[0], -1)))
    params, state = forward.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), is_training=False)
    with pytest.raises(ValueError, match="no weight-standardised convolution"):
        si.standardized_kernels(forward, params, state, jnp.zeros((1, 32, 32, 3)))
