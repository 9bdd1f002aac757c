"""`remat=True` (hk.remat around every block) changes memory, never parameters or numbers.

One family with stochastic depth and dropout (RNG inside the recomputed block) and one with
BatchNorm state (Haiku state inside it); every family shares the block loop that applies remat.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models

TINY = {
    "nfnet_f0": dict(depths=(1, 1, 1, 1), widths=(16, 16, 32, 32), group_size=8, stem_channels=(4, 4, 8, 8),
                     stochdepth_rate=0.25, drop_rate=0.2),
    "bn_resnet50": dict(depths=(1, 1, 1, 1), width=0.25),
}


def _loss_and_grads(name, remat):
    forward = hk.transform_with_state(
        lambda x: models.create(name, 5, remat=remat, **TINY[name])(x, is_training=True))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    params, state = forward.init(jax.random.PRNGKey(0), images)

    def loss(p):
        logits, _ = forward.apply(p, state, jax.random.PRNGKey(2), images)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0]) + 0.1 * jnp.sum(logits**2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return params, value, grads


@pytest.mark.parametrize("name", [pytest.param("nfnet_f0", marks=pytest.mark.slow),
                                  pytest.param("bn_resnet50", marks=pytest.mark.slow)])
def test_remat_keeps_parameters_loss_and_gradients(name):
    params, value, grads = _loss_and_grads(name, remat=False)
    params_r, value_r, grads_r = _loss_and_grads(name, remat=True)
    assert jax.tree.structure(params) == jax.tree.structure(params_r)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(want)) + 1e-12))
