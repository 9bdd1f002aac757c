"""The per-device train and eval steps against single-device re-derivations.

Expectations are computed without the step: a plain `jax.grad` of the global-batch mean loss
(written out here) fed to the same optax chain, the TF1 EMA formula, and NumPy logits for eval.
"""

import functools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fakes  # tests/fakes.py
from nfnets_jax.train import evaluation, parallel
from nfnets_jax.train.state import init_train_state
from nfnets_jax.train.step import make_eval_step, make_train_step

NUM_CLASSES = 7  # > 5, so that top-5 is not trivially 1
IMAGE_SHAPE = (4, 4, 3)
BATCH = 8
SMOOTHING = 0.1


def _setup(compute_dtype="float32", ema_decay=0.99, backend_name="pmap"):
    config = fakes.fake_config(**{"optimizer.ema_decay": ema_decay, "loss.label_smoothing": SMOOTHING,
                                  "precision.compute_dtype": compute_dtype})
    data = fakes.FakeData(num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE)
    experiment = fakes.fake_experiment(config, data)
    backend = parallel.make_backend(backend_name)
    init = functools.partial(init_train_state, experiment.forward, experiment.optimizer, seed=0,
                             sample_images=jnp.zeros((1, *IMAGE_SHAPE)), use_ema=ema_decay is not None)
    state = jax.jit(init, out_shardings=backend.replicated)()
    train_fn = backend.wrap_train(make_train_step(experiment.forward, experiment.optimizer, experiment.step_settings))
    return experiment, data, backend, state, train_fn


def _reference_loss(params, forward, images, labels):
    logits, _ = forward.apply(params, {}, None, images, is_training=True)
    targets = (1 - SMOOTHING) * jax.nn.one_hot(labels, NUM_CLASSES) + SMOOTHING / NUM_CLASSES
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


@pytest.mark.slow
def test_two_steps_on_four_devices_match_one_big_batch_on_one_device():
    experiment, data, backend, state, train_fn = _setup()
    params = parallel.first_replica(state.params)
    opt_state = experiment.optimizer.init(params)
    batches = data.train_batches(0, global_batch_size=BATCH)
    for _ in range(2):
        batch = next(batches)
        state, metrics = train_fn(state, backend.put_batch(batch))
        images = batch["images"].reshape(BATCH, *IMAGE_SHAPE)
        labels = batch["labels"].reshape(BATCH)
        loss, grads = jax.value_and_grad(_reference_loss)(params, experiment.forward, images, labels)
        updates, opt_state = experiment.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        host = parallel.first_replica(metrics)
        np.testing.assert_allclose(host["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(host["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    chex.assert_trees_all_close(parallel.first_replica(state.params), params, atol=1e-6)
    assert int(parallel.first_replica(state.step)) == 2


@pytest.mark.slow
def test_state_is_one_replicated_copy_with_identical_shards():
    _, data, backend, state, train_fn = _setup()
    state, _ = train_fn(state, backend.put_batch(next(data.train_batches(0, global_batch_size=BATCH))))
    w = state.params["fake_net/~/linear"]["w"]
    assert w.shape == (int(np.prod(IMAGE_SHAPE)), NUM_CLASSES)  # no stacked device axis
    shards = [np.asarray(s.data) for s in w.addressable_shards]
    assert len(shards) == jax.device_count()
    for shard in shards[1:]:
        np.testing.assert_array_equal(shard, shards[0])


@pytest.mark.slow
def test_bfloat16_forward_keeps_float32_params_optimizer_and_ema():
    _, data, backend, state, train_fn = _setup(compute_dtype="bfloat16")
    _, _, _, state32, train_fn32 = _setup(compute_dtype="float32")
    batch = backend.put_batch(next(data.train_batches(0, global_batch_size=BATCH)))
    state, metrics = train_fn(state, batch)
    state32, metrics32 = train_fn32(state32, batch)
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype("float32")}
    # bf16 has an 8-bit mantissa: the loss agrees to about 1%, not to float32 precision.
    np.testing.assert_allclose(metrics["loss"], metrics32["loss"], rtol=2e-2)
    assert float(metrics["loss"]) != float(metrics32["loss"])


@pytest.mark.slow
def test_ema_follows_the_tf1_formula():
    decay = 0.99
    _, data, backend, state, train_fn = _setup(ema_decay=decay)
    initial = parallel.first_replica(state.params)
    state, _ = train_fn(state, backend.put_batch(next(data.train_batches(0, global_batch_size=BATCH))))
    new = parallel.first_replica(state.params)
    decay_0 = min(decay, (1 + 0) / (10 + 0))  # step 0: the (1+t)/(10+t) warmup binds
    expected = jax.tree.map(lambda e, p: decay_0 * e + (1 - decay_0) * p, initial, new)
    chex.assert_trees_all_close(parallel.first_replica(state.ema_params), expected, atol=1e-7)


@pytest.mark.slow
def test_non_finite_step_leaves_the_state_unchanged_and_is_flagged():
    _, data, backend, state, train_fn = _setup()
    before = parallel.first_replica(state)
    batch = next(data.train_batches(0, global_batch_size=BATCH))
    batch["images"][0, 0, 0, 0, 0] = np.nan
    state, metrics = train_fn(state, backend.put_batch(batch))
    after = parallel.first_replica(state)
    assert float(parallel.first_replica(metrics["nonfinite"])) == 1.0
    chex.assert_trees_all_equal(after.params, before.params)
    chex.assert_trees_all_equal(after.ema_params, before.ema_params)
    floating = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    chex.assert_trees_all_equal(floating(after.opt_state), floating(before.opt_state))
    # The optimizer's own step counts still advance with the step, so the schedule does not lag
    # behind `state.step` (the learning rate logged is the one applied next).
    counts = [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(after.opt_state, "count")]
    assert counts and all(c == 1 for c in counts)
    assert int(after.step) == 1


@pytest.mark.parametrize("backend_name", ["pmap", "shard_map"])
def test_eval_counts_every_example_once_when_the_batch_does_not_divide(backend_name):
    experiment, data, backend, state, _ = _setup(backend_name=backend_name)
    eval_fn = backend.wrap_eval(make_eval_step(experiment.forward))
    results = evaluation.evaluate(eval_fn, state.params, state.model_state,
                                  data.eval_batches(global_batch_size=BATCH), backend.put_batch)
    # NumPy re-derivation on all 37 examples (37 = 4 full batches of 8 + 5).
    images, labels = data.eval_arrays()
    params = parallel.first_replica(state.params)["fake_net/~/linear"]
    logits = images.reshape(len(labels), -1).astype(np.float64) @ params["w"] + params["b"]
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)
    assert results["num_examples"] == len(labels) == 37
    np.testing.assert_allclose(results["top_1_acc"], np.mean(ranks < 1), rtol=1e-6)
    np.testing.assert_allclose(results["top_5_acc"], np.mean(ranks < 5), rtol=1e-6)
    np.testing.assert_allclose(results["loss"], -np.mean(log_probs[np.arange(len(labels)), labels]), rtol=1e-4)


@pytest.mark.slow
def test_raw_and_ema_are_evaluated_in_one_pass_over_the_eval_split():
    # The eval split is read and preprocessed once for both trees (it was read twice).
    experiment, data, backend, state, train_fn = _setup()
    state, _ = train_fn(state, backend.put_batch(next(data.train_batches(0, global_batch_size=BATCH))))
    eval_fn = backend.wrap_eval(make_eval_step(experiment.forward))
    passes = []

    def make_batches():
        passes.append(1)
        return data.eval_batches(global_batch_size=BATCH)

    results = evaluation.evaluate_raw_and_ema(eval_fn, state, make_batches, backend.put_batch)
    assert len(passes) == 1
    for prefix, params in (("", state.params), ("ema_", state.ema_params)):
        alone = evaluation.evaluate(eval_fn, params, state.model_state,
                                    data.eval_batches(global_batch_size=BATCH), backend.put_batch)
        for name in ("top_1_acc", "top_5_acc", "loss"):
            assert results[prefix + name] == alone[name], prefix + name
    assert results["ema_loss"] != results["loss"]


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_the_finiteness_check_flags_exactly_the_non_finite_elements(platform):
    """Both forms of the check (`step._all_finite`: the CPU's `all`, the others' sum of x·0), each
    run here on the CPU by calling the function its platform's branch is lowered from."""
    from nfnets_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

    def check(tree):
        if platform == "cpu":
            return jax.jit(step_lib._all_finite)(tree)
        # Lowered for a TPU, the same call compiles the sum; run that program's branch on the CPU.
        with mock.patch.object(step_lib.lax, "platform_dependent",
                               lambda *args, cpu, default: default(*args)):
            return jax.jit(step_lib._all_finite)(tree)

    finite = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,), jnp.bfloat16), "count": jnp.array(7, jnp.int32)}
    assert bool(check(finite)) and bool(check({}))
    # Finite but huge: its squared norm overflows float32, and it is still finite.
    assert bool(check({**finite, "w": jnp.full((3, 4), 3e38, jnp.float32)}))
    for bad in (np.inf, -np.inf, np.nan):
        assert not bool(check({**finite, "w": finite["w"].at[2, 1].set(bad)}))
        assert not bool(check({**finite, "b": finite["b"].at[0].set(bad)}))


def test_the_finiteness_check_is_chosen_for_the_platform_the_step_is_lowered_for():
    from nfnets_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

    tree = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
    lowered = {platform: jax.jit(step_lib._all_finite).trace(tree).lower(lowering_platforms=(platform,)).as_text()
               for platform in ("cpu", "tpu")}
    assert "stablehlo.is_finite" in lowered["cpu"] and "stablehlo.and" in lowered["cpu"]
    assert "stablehlo.multiply" in lowered["tpu"] and "stablehlo.and" not in lowered["tpu"]
