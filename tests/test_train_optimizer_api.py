"""One optimizer path from notebook to pod: any optax transformation through the runner.

The runner takes the config's optimizer or one built in Python; `optim.with_sam` is its only SAM,
fed `grad_fn`, `batch` and the device axis by the train step; the learning rate is read from the
optimizer state. Expectations are re-derived here without the runner.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nfnets_jax.train
from nfnets_jax import optim
import fakes  # tests/fakes.py
from nfnets_jax.train import parallel
from nfnets_jax.train.state import init_train_state
from nfnets_jax.train.step import make_train_step

BATCH = 20  # 5 per device on 4 devices: the ascent slice is the first floor(0.2 * 5) = 1
RHO = 0.05


def _config(**overrides):
    return fakes.fake_config(**{"train.batch_size": BATCH, "parallel.backend": "pmap",
                                "checkpoint.every_steps": 100, **overrides})


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_sam_built_in_python_trains_through_the_runner_like_the_config_sam():
    """Done-when of the issue: with_sam(make_optimizer(...)) from Python, under pmap on 4
    devices, reaches the params of the run whose config asks for SAM, from the same seed."""
    assert jax.device_count() == 4
    data = fakes.FakeData(num_classes=5)
    config_sam = _config(**{"optimizer.sam.rho": RHO})
    from_config = fakes.fake_experiment(config_sam, data, drop_rate=0.2)

    plain = _config()
    opt_config = optim.validate_optimizer_config(plain.optimizer)
    python_sam = optim.with_sam(optim.make_optimizer(opt_config, **fakes.fake_schedule_args(plain)), rho=RHO)
    from_python = fakes.fake_experiment(plain, data, drop_rate=0.2, optimizer=python_sam)

    import tempfile  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        summary_config = nfnets_jax.train.run(from_config, a, progress_bar=False, verbose=False)
        summary_python = nfnets_jax.train.run(from_python, b, progress_bar=False, verbose=False)
    chex.assert_trees_all_close(parallel.first_replica(summary_python.state.params),
                                parallel.first_replica(summary_config.state.params), atol=1e-7)
    assert summary_python.series("loss")[1].tolist() == summary_config.series("loss")[1].tolist()
    # ... and SAM did something: a run without it ends elsewhere.
    with tempfile.TemporaryDirectory() as c:
        summary_plain = nfnets_jax.train.run(fakes.fake_experiment(plain, data, drop_rate=0.2), c,
                                             progress_bar=False, verbose=False)
    diff = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))),
                        parallel.first_replica(summary_plain.state.params),
                        parallel.first_replica(summary_config.state.params))
    assert max(jax.tree.leaves(diff)) > 1e-4


def _reference_loss(params, forward, images, labels, num_classes):
    logits, _ = forward.apply(params, {}, None, images, is_training=True)
    return jnp.mean(-jnp.sum(jax.nn.one_hot(labels, num_classes) * jax.nn.log_softmax(logits), -1))


@pytest.mark.parametrize("backend_name", [pytest.param("pmap", marks=pytest.mark.slow), "shard_map"])  # pmap: ~5 s
def test_sam_step_is_the_unsynced_ascent_per_device_then_the_averaged_descent(backend_name):
    """Host re-derivation of one step (paper §6.1, App. A.4): each device perturbs the params by
    ρ·g/‖g‖ with g from the first fifth of its own batch, takes the descent gradient on its full
    batch there; the four descent gradients are averaged and fed to the NFNet chain."""
    config = _config(**{"optimizer.sam.rho": RHO, "loss.label_smoothing": 0.0})
    data = fakes.FakeData(num_classes=5)
    experiment = fakes.fake_experiment(config, data)
    backend = parallel.make_backend(backend_name)
    init = functools.partial(init_train_state, experiment.forward, experiment.optimizer, seed=0,
                             sample_images=jnp.zeros((1, *data.image_shape)), use_ema=False)
    state = jax.jit(init, out_shardings=backend.replicated)()
    params = parallel.first_replica(state.params)
    train_fn = backend.wrap_train(make_train_step(experiment.forward, experiment.optimizer, experiment.step_settings))
    batch = next(data.train_batches(0, global_batch_size=BATCH))
    state, metrics = train_fn(state, backend.put_batch(batch))

    loss = functools.partial(_reference_loss, forward=experiment.forward, num_classes=5)
    descent, losses = [], []
    for images, labels in zip(batch["images"], batch["labels"]):  # one device's examples each
        ascent = jax.grad(loss)(params, images=images[:1], labels=labels[:1])
        norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(ascent)))
        perturbed = jax.tree.map(lambda p, g: p + RHO * g / norm, params, ascent)
        value, grads = jax.value_and_grad(loss)(perturbed, images=images, labels=labels)
        descent.append(grads)
        losses.append(value)
    mean_descent = jax.tree.map(lambda *g: sum(g) / len(g), *descent)
    chain = optim.make_optimizer(optim.validate_optimizer_config(config.optimizer), **fakes.fake_schedule_args(config))
    updates, _ = chain.update(mean_descent, chain.init(params), params)
    expected = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(parallel.first_replica(state.params), expected, atol=1e-6)
    host = parallel.first_replica(metrics)
    np.testing.assert_allclose(host["loss"], np.mean(losses), rtol=1e-5)  # the descent pass's loss
    np.testing.assert_allclose(host["grad_norm"], optax.tree.norm(mean_descent), rtol=1e-5)


def test_learning_rate_and_momentum_are_logged_from_the_optimizer_state(tmp_path):
    # fake_config: lr 0.1, no warmup, cosine to 0 over 6 steps; the step s record holds the
    # rate applied by the s-th update, i.e. at t = s - 1: 0.05 * (1 + cos(pi t / 6)).
    config = _config()
    summary = nfnets_jax.train.run(fakes.fake_experiment(config, fakes.FakeData()), str(tmp_path),
                                   progress_bar=False, verbose=False)
    steps, rates = summary.series("learning_rate")
    assert steps.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(rates, [0.05 * (1 + math.cos(math.pi * (s - 1) / 6)) for s in steps], rtol=1e-6)
    np.testing.assert_allclose(summary.series("momentum")[1], 0.9, rtol=1e-6)
    assert summary.series("agc/clip_fraction")[0].tolist() == [1, 2, 3, 4, 5, 6]


def _tree():
    return {"net/~/conv": {"w": jnp.ones((3, 3, 2, 4)), "b": jnp.zeros(4)}, "net/~/linear": {"w": jnp.ones((4, 3))}}


@pytest.mark.slow  # over ~3 s on 2 cores: not in the `-m "not slow"` inner loop
def test_hyperparams_and_agc_telemetry_are_found_whatever_wraps_them():
    schedule = lambda count: 0.5 / (1 + count)
    agc_then_adamw = optax.chain(optim.adaptive_grad_clip(1e-3),
                                 optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, b1=0.7))
    wrapped = optim.with_sam(optax.chain(optax.clip(10.0), agc_then_adamw), rho=RHO)
    params = _tree()
    state = wrapped.init(params)
    grad_fn = lambda p, batch: jax.tree.map(lambda x: jnp.mean(batch) * jnp.ones_like(x), p)
    for _ in range(3):
        _, state = wrapped.update(None, state, params, grad_fn=grad_fn, batch=jnp.arange(5.0))
    found = optim.current_hyperparams(state)
    np.testing.assert_allclose(found["learning_rate"], 0.5 / 3)  # the third update used count 2
    np.testing.assert_allclose(found["b1"], 0.7, rtol=1e-6)
    # Every unit's gradient (2.0) is far above 1e-3 * its weight norm: all 4 + 1 + 3 units clipped.
    assert float(optim.clip_fraction_metrics(state)["agc/clip_fraction"]) == 1.0
    # Two injected optimizers: the second one's names get a suffix.
    both = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                       optax.inject_hyperparams(optax.sgd)(learning_rate=0.2))
    np.testing.assert_allclose(list(optim.current_hyperparams(both.init(params)).values()), [0.1, 0.2], rtol=1e-6)
    assert list(optim.current_hyperparams(both.init(params))) == ["learning_rate", "learning_rate_1"]
    assert optim.current_hyperparams(optax.adamw(1e-3).init(params)) == {}


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_a_plain_optax_optimizer_trains_through_the_runner_and_runs_in_pieces(tmp_path):
    # optax.sgd: a plain GradientTransformation, no extra arguments, nothing injected.
    config = _config(**{"train.steps": 4})
    data = fakes.FakeData()
    make = lambda: fakes.fake_experiment(config, data, optimizer=optax.sgd(0.05, momentum=0.9))
    whole = nfnets_jax.train.run(make(), str(tmp_path / "whole"), progress_bar=False, verbose=False)
    first = nfnets_jax.train.run(make(), str(tmp_path / "pieces"), num_steps=3, progress_bar=False, verbose=False)
    assert (first.step, first.stopped_by) == (3, "num_steps")
    assert first.eval_metrics  # a piece ends with an evaluation, for the notebook to show
    rest = nfnets_jax.train.run(make(), str(tmp_path / "pieces"), progress_bar=False, verbose=False)
    assert (rest.step, rest.stopped_by) == (4, "completed")
    chex.assert_trees_all_close(parallel.first_replica(rest.state.params),
                                parallel.first_replica(whole.state.params), atol=1e-7)
    assert "learning_rate" not in whole.history[0]  # optax.sgd(0.05) keeps no rate in its state
    assert [r["step"] for r in whole.history if r["split"] == "train"] == [1, 2, 3, 4]


def test_an_optimizer_that_is_not_optax_is_refused_before_anything_is_built():
    config = _config()
    with pytest.raises(ValueError, match="optax transformation"):
        nfnets_jax.train.build_experiment(config, optimizer=lambda grads: grads)
