"""The pmap and jit(shard_map) backends run the same per-device step to the same params."""

import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes  # tests/fakes.py
from nfnets_jax.train import parallel
from nfnets_jax.train.state import init_train_state
from nfnets_jax.train.step import make_train_step

STEPS = 3
BATCH = 16


def _train(backend_name: str, config):
    data = fakes.FakeData(num_classes=5)
    experiment = fakes.fake_experiment(config, data, drop_rate=0.3)
    backend = parallel.make_backend(backend_name)
    init = functools.partial(init_train_state, experiment.forward, experiment.optimizer, seed=0,
                             sample_images=jnp.zeros((1, *data.image_shape)), use_ema=True)
    state = jax.jit(init, out_shardings=backend.replicated)()
    train_fn = backend.wrap_train(make_train_step(experiment.forward, experiment.optimizer, experiment.step_settings))
    batches = data.train_batches(0, global_batch_size=BATCH)
    history = []
    for _ in range(STEPS):
        state, metrics = train_fn(state, backend.put_batch(next(batches)))
        history.append(parallel.first_replica(metrics))
    return parallel.first_replica(state), history


@pytest.mark.slow
@pytest.mark.parametrize("sam_rho", [None, 0.05], ids=["sgd_agc", "sam"])
def test_pmap_and_shard_map_reach_the_same_params(sam_rho):
    # Dropout makes the per-device RNG matter; SAM adds a per-device (unsynced) ascent step.
    config = fakes.fake_config(**{"train.batch_size": BATCH, "optimizer.sam.rho": sam_rho,
                                  "optimizer.sam.ascent_fraction": 0.5})
    pmap_state, pmap_history = _train("pmap", config)
    shard_state, shard_history = _train("shard_map", config)
    chex.assert_trees_all_close(pmap_state.params, shard_state.params, atol=1e-6)
    chex.assert_trees_all_close(pmap_state.opt_state, shard_state.opt_state, atol=1e-6)
    chex.assert_trees_all_close(pmap_state.ema_params, shard_state.ema_params, atol=1e-6)
    chex.assert_trees_all_close(pmap_history, shard_history, rtol=1e-5)
    # ... and the run did something: params moved away from the init.
    assert pmap_history[0]["grad_norm"] > 0


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="pmap.*shard_map"):
        parallel.make_backend("pjit")


def test_first_replica_returns_one_host_copy():
    backend = parallel.make_backend("shard_map")
    tree = backend.replicate({"w": jnp.arange(6.0).reshape(2, 3)})
    host = parallel.first_replica(tree)
    assert host["w"].shape == (2, 3)
    assert type(host["w"]).__module__ == "numpy"


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["pmap", "shard_map"])
def test_every_device_and_every_step_draws_its_own_dropout_key(backend_name):
    # jaxline's 'unique_host_unique_device' (docs/official_code_notes.md): the equality of the two
    # backends above would hold even if every device, or every step, reused one key.
    keys = []

    def forward_fn(images, is_training):
        key = hk.next_rng_key() if is_training else None
        if key is not None:
            jax.debug.callback(lambda k: keys.append(tuple(np.asarray(k).ravel())), key)
        return hk.Linear(3, name="linear")(images.reshape(images.shape[0], -1))

    config = fakes.fake_config(**{"train.batch_size": 8})
    data = fakes.FakeData(num_classes=3)
    experiment = fakes.fake_experiment(config, data)
    forward = hk.transform_with_state(forward_fn)
    backend = parallel.make_backend(backend_name)
    init = functools.partial(init_train_state, forward, experiment.optimizer, seed=0,
                             sample_images=jnp.zeros((1, *data.image_shape)), use_ema=False)
    state = jax.jit(init, out_shardings=backend.replicated)()
    jax.effects_barrier()
    keys.clear()  # the init's own key
    train_fn = backend.wrap_train(make_train_step(forward, experiment.optimizer, experiment.step_settings))
    batches = data.train_batches(0, global_batch_size=8)
    for _ in range(2):
        state, metrics = train_fn(state, backend.put_batch(next(batches)))
    jax.block_until_ready(metrics)
    jax.effects_barrier()
    assert len(keys) == 2 * jax.device_count()
    assert len(set(keys)) == len(keys)
