"""The paper's modified SAM (Brock et al. 2021 §6.1, A.4): slicing, normalisation, pmap, optax parity."""

import numpy as np
import optax
import pytest

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax import losses, optim
from nfnets_jax.optim import sam as sam_lib

RHO = 0.05


class _TinyNet(hk.Module):
    """Two Linears named like an NFNet's: `NFNet/~/stem` and the classifier `NFNet/~/linear`."""

    def __call__(self, x):
        hidden = jax.nn.gelu(hk.Linear(6, name="stem")(x))
        return hk.Linear(3)(hidden)


_net = hk.without_apply_rng(hk.transform(lambda x: _TinyNet(name="NFNet")(x)))


def _loss(params, batch):
    logits = _net.apply(params, batch["images"])
    targets = jax.nn.one_hot(batch["labels"], 3)
    return jnp.mean(losses.softmax_cross_entropy(logits, targets))


_grad = jax.grad(_loss)


def _batch(seed, size):
    rng = np.random.default_rng(seed)
    return {
        "images": np.asarray(rng.normal(size=(size, 4)), np.float32),
        "labels": np.asarray(rng.integers(0, 3, size=size), np.int32),
    }


def _nfnet_optimizer():
    config = optim.default_optimizer_config()
    config.update({"warmup_epochs": 1, "lr_scale_by_batch": False, "weight_decay": 1e-3})
    config.agc.clipping = 0.05
    return optim.make_optimizer(config, steps_per_epoch=1, total_steps=20, batch_size=8)


@pytest.mark.parametrize(
    "batch_size, fraction, expected",
    [(10, 0.2, 2), (512, 0.2, 102), (100, 0.29, 29), (7, 0.2, 1), (3, 0.01, 1), (5, 1.0, 5)],
)
def test_ascent_size_is_floor_and_at_least_one(batch_size, fraction, expected):
    assert sam_lib.ascent_size(batch_size, fraction) == expected


def test_ascent_uses_exactly_the_first_fifth_of_the_batch():
    """Toy loss L(w) = mean_i w·x_i + ½‖w‖²: ∇L = mean_i x_i + w is known in closed form.

    With x_i = e_i (one-hot) and w = 0, the ascent gradient on the first k = 2 of 10 examples is
    (e_0 + e_1)/2, so the perturbation must be ρ(e_0 + e_1)/√2, and the descent gradient on the
    full batch at w + perturbation is mean_i e_i + perturbation.
    """
    batch = {"x": jnp.eye(10), "index": jnp.arange(10)}

    def grad_fn(params, batch):
        grads = jax.grad(lambda w: jnp.mean(batch["x"] @ w) + 0.5 * jnp.sum(w**2))(params)
        return grads, batch["index"]

    params = jnp.zeros(10)
    grads, aux = optim.sam_gradients(grad_fn, params, batch, rho=RHO, ascent_fraction=0.2, sync_ascent=False)
    perturbation = np.zeros(10)
    perturbation[:2] = RHO / np.sqrt(2)
    np.testing.assert_allclose(grads, np.full(10, 0.1) + perturbation, rtol=1e-6)
    np.testing.assert_array_equal(aux, np.arange(10))  # the descent pass sees the full batch


def test_zero_ascent_gradient_gives_no_nan_and_no_perturbation():
    def grad_fn(params, batch):
        return jax.tree.map(jnp.zeros_like, params), params

    params = {"m": {"w": jnp.ones((2, 2))}}
    grads, seen_params = optim.sam_gradients(
        grad_fn, params, {"x": jnp.ones((5, 1))}, rho=RHO, ascent_fraction=0.2, sync_ascent=False
    )
    assert np.all(np.isfinite(grads["m"]["w"]))
    np.testing.assert_array_equal(seen_params["m"]["w"], params["m"]["w"])


@pytest.mark.parametrize("make_inner", [pytest.param(_nfnet_optimizer, marks=pytest.mark.slow),  # ~4 s
                                        lambda: optax.adamw(1e-2)], ids=["nfnet", "adamw"])
def test_full_fraction_synced_equals_optax_contrib_sam_opaque_mode(make_inner):
    params = _net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    ours = optim.with_sam(make_inner(), rho=RHO, ascent_fraction=1.0, sync_ascent=True)
    reference = optax.contrib.sam(
        make_inner(), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True
    )

    @jax.jit
    def step_ours(params, state, batch):
        updates, state = ours.update(_grad(params, batch), state, params, grad_fn=_grad, batch=batch)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def step_reference(params, state, batch):
        grad_fn = lambda p, _: _grad(p, batch)
        updates, state = reference.update(_grad(params, batch), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    ours_params, ours_state = params, ours.init(params)
    ref_params, ref_state = params, reference.init(params)
    for seed in range(4):
        batch = _batch(seed, 8)
        ours_params, ours_state = step_ours(ours_params, ours_state, batch)
        ref_params, ref_state = step_reference(ref_params, ref_state, batch)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours_params, ref_params)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ours_params, params)
    assert min(jax.tree.leaves(moved)) > 0


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_pmap_replicas_perturb_differently_but_end_each_step_identical():
    devices = jax.devices()[:2]
    inner = _nfnet_optimizer()
    optimizer = optim.with_sam(inner, rho=RHO, ascent_fraction=0.25, sync_ascent=False, axis_name="batch")

    def grad_with_seen_params(params, batch):
        return _grad(params, batch), params

    def step(params, state, batch):
        _, perturbed = optim.sam_gradients(
            grad_with_seen_params, params, batch, rho=RHO, ascent_fraction=0.25, sync_ascent=False, axis_name="batch"
        )
        _, synced = optim.sam_gradients(
            grad_with_seen_params, params, batch, rho=RHO, ascent_fraction=0.25, sync_ascent=True, axis_name="batch"
        )
        updates, state = optimizer.update(None, state, params, grad_fn=_grad, batch=batch)
        return optax.apply_updates(params, updates), state, (perturbed, synced)

    p_step = jax.pmap(step, axis_name="batch", devices=devices)
    params = _net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    replicated = jax.tree.map(lambda x: np.stack([x, x]), (params, optimizer.init(params)))
    expected_params, expected_state = params, inner.init(params)
    for seed in range(2):
        per_device = [_batch(10 * seed + device, 8) for device in range(2)]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *per_device)
        new_params, new_state, (perturbed, synced) = p_step(*replicated, stacked)
        replicated = (new_params, new_state)

        for leaf in jax.tree.leaves(perturbed):
            assert not np.allclose(leaf[0], leaf[1]), "unsynced ascent must perturb each replica differently"
        for leaf in jax.tree.leaves(synced):
            np.testing.assert_allclose(leaf[0], leaf[1], rtol=1e-6)  # sync_ascent=True: one shared perturbation
        for leaf in jax.tree.leaves(new_params):
            np.testing.assert_array_equal(leaf[0], leaf[1])

        # Host re-derivation: each replica's descent gradient at its own perturbation, averaged.
        descent = [
            optim.sam_gradients(
                lambda p, b: (_grad(p, b), None), expected_params, batch,
                rho=RHO, ascent_fraction=0.25, sync_ascent=False,
            )[0]
            for batch in per_device
        ]
        mean_descent = jax.tree.map(lambda a, b: (a + b) / 2, *descent)
        updates, expected_state = inner.update(mean_descent, expected_state, expected_params)
        expected_params = optax.apply_updates(expected_params, updates)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-7), new_params, expected_params
        )


@pytest.mark.slow  # over ~3 s on 2 cores: not in the `-m "not slow"` inner loop
def test_update_never_leaves_params_perturbed():
    """Inner = plain SGD: w_new = w − lr · ∇L(w + ε) exactly, i.e. applied to w, not to w + ε."""
    params = _net.init(jax.random.PRNGKey(1), jnp.zeros((1, 4)))
    batch = _batch(0, 10)
    optimizer = optim.with_sam(optax.sgd(0.5), rho=RHO)
    updates, _ = optimizer.update(None, optimizer.init(params), params, grad_fn=_grad, batch=batch)
    descent, _ = optim.sam_gradients(
        lambda p, b: (_grad(p, b), None), params, batch, rho=RHO, ascent_fraction=0.2, sync_ascent=False
    )
    jax.tree.map(
        lambda u, p, g: np.testing.assert_allclose(p + u, p - 0.5 * g, rtol=1e-6, atol=1e-7),
        updates,
        params,
        descent,
    )


def test_switching_sam_off_keeps_the_same_update_call():
    params = _net.init(jax.random.PRNGKey(2), jnp.zeros((1, 4)))
    batch = _batch(3, 8)
    config = optim.default_optimizer_config()
    assert optim.with_sam_from_config(optax.sgd(0.1), config.sam) is not None
    plain = optim.with_sam_from_config(_nfnet_optimizer(), config.sam)  # rho None: SAM off
    grads = _grad(params, batch)
    updates, _ = plain.update(grads, plain.init(params), params, grad_fn=_grad, batch=batch)
    reference = _nfnet_optimizer()
    expected, _ = reference.update(grads, reference.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)


def test_errors_are_raised_early_with_a_hint():
    with pytest.raises(ValueError, match="rho must be > 0"):
        optim.with_sam(optax.sgd(0.1), rho=0.0)
    with pytest.raises(ValueError, match="ascent_fraction"):
        optim.with_sam(optax.sgd(0.1), ascent_fraction=1.2)
    optimizer = optim.with_sam(optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="grad_fn=..., batch=..."):
        optimizer.update(params, optimizer.init(params), params)
    with pytest.raises(ValueError, match="leading example axis"):
        optim.sam_gradients(
            lambda p, b: (p, None), params, {"x": jnp.ones((4, 2)), "y": jnp.ones(3)},
            rho=RHO, ascent_fraction=0.5, sync_ascent=False,
        )


@pytest.mark.parametrize("sync_ascent", [False, True])
def test_pmap_perturbation_is_normalised_after_the_average_in_closed_form(sync_ascent):
    """Toy loss L(w) = mean_i x_i·w + ½‖w‖² at w = 0: the ascent gradient is the mean of the
    ascent slice's x_i. Device 0's slice is 3·e_0, device 1's is e_1.

    Unsynced, each replica moves by ρ·g_d/‖g_d‖: ρ·e_0 and ρ·e_1. Synced (plain SAM), both
    move by ρ·ḡ/‖ḡ‖ with ḡ = (1.5, 0.5, 0): normalising *after* the pmean. (Averaging the
    per-device perturbations instead would give ρ·(0.5, 0.5, 0), which is not a unit step.)
    """
    x = np.zeros((2, 5, 3), np.float32)
    x[0, 0, 0], x[1, 0, 1] = 3.0, 1.0  # the ascent slice (first 1 of 5) of each device
    x[:, 1:, 2] = 1.0  # the rest of the batch, which the ascent must not see

    def grad_fn(params, batch):
        return jax.grad(lambda w: jnp.mean(batch["x"] @ w) + 0.5 * jnp.sum(w**2))(params), params

    def perturbed(batch):
        return optim.sam_gradients(
            grad_fn, jnp.zeros(3), batch, rho=RHO, ascent_fraction=0.2, sync_ascent=sync_ascent, axis_name="i"
        )[1]

    got = jax.pmap(perturbed, axis_name="i", devices=jax.devices()[:2])({"x": x})
    if sync_ascent:
        mean = np.array([1.5, 0.5, 0.0])
        expected = np.stack([RHO * mean / np.linalg.norm(mean)] * 2)
    else:
        expected = RHO * np.eye(3)[:2]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
