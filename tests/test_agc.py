"""AGC (Brock et al. 2021 §4): optax equivalence, NumPy-derived clip counts, telemetry lookup."""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from nfnets_jax import optim
from nfnets_jax.optim import agc as agc_lib

CLIPPING, EPS = 0.01, 1e-3


def _tree(seed, zero_skip_gain=True):
    """Every parameter rank a Haiku model produces, with Haiku-style paths."""
    rng = np.random.default_rng(seed)
    shapes = {
        "NFNet/~/stem_conv0": {"w": (3, 3, 2, 5), "gain": (5,), "bias": (5,)},
        "NFNet/~/nf_block": {"skip_gain": ()},
        "NFNet/~/nf_block/~/conv0": {"w": (1, 1, 5, 4)},
        "NFNet/~/nf_block/~/odd": {"w": (1, 1, 1, 4), "w5": (2, 2, 2, 3, 4)},
        "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": (4, 3), "b": (3,)},
        "NFNet/~/heads": {"w": (4, 3, 2)},
        "NFNet/~/linear": {"w": (4, 6), "b": (6,)},
    }
    tree = {
        module: {leaf: np.asarray(rng.normal(size=shape), np.float32) for leaf, shape in leaves.items()}
        for module, leaves in shapes.items()
    }
    if zero_skip_gain:
        tree["NFNet/~/nf_block"]["skip_gain"] = np.zeros((), np.float32)
        tree["NFNet/~/stem_conv0"]["bias"] = np.zeros(5, np.float32)
    return tree


def _grads(params, seed):
    """Gradients whose scale varies per unit, so some units clip and some do not."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: np.asarray(
            rng.normal(size=p.shape) * 10.0 ** rng.uniform(-5, 0, size=p.shape[-1:] if p.ndim else ()), np.float32
        ),
        params,
    )


def _numpy_unit_norms(x):
    """The paper's unit norm, re-derived: HWIO/DHWIO over all but O, IO over I, ≤1-D whole."""
    x = np.asarray(x, np.float64)
    if np.squeeze(x).ndim <= 1:
        return np.sqrt(np.sum(x**2)) * np.ones((), np.float64), 1
    axes = (0,) if x.ndim in (2, 3) else tuple(range(x.ndim - 1))
    norms = np.sqrt(np.sum(x**2, axis=axes, keepdims=True))
    return norms, norms.size


def _numpy_clips(weight, grad):
    """(clipped units, units) of one leaf, from the NumPy unit norms."""
    weight_norm, units = _numpy_unit_norms(weight)
    grad_norm, _ = _numpy_unit_norms(grad)
    return int(np.sum(grad_norm > CLIPPING * np.maximum(weight_norm, EPS))), units


@pytest.mark.parametrize("clipping", [CLIPPING, 0.5])
def test_matches_optax_adaptive_grad_clip_leaf_by_leaf(clipping):
    params = _tree(0)
    grads = _grads(params, 1)
    ours = optim.adaptive_grad_clip(clipping, EPS)
    reference = optax.adaptive_grad_clip(clipping, EPS)
    clipped, _ = jax.jit(ours.update)(grads, ours.init(params), params)
    expected, _ = jax.jit(reference.update)(grads, reference.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), clipped, expected)


def test_clip_counts_match_numpy():
    params = _tree(2)
    grads = _grads(params, 3)
    transform = optim.adaptive_grad_clip(CLIPPING, EPS)
    _, state = jax.jit(transform.update)(grads, transform.init(params), params)
    total_clipped = total_units = 0
    for module, leaves in params.items():
        for leaf, value in leaves.items():
            expected, units = _numpy_clips(value, grads[module][leaf])
            assert int(state.num_clipped[module][leaf]) == expected, (module, leaf)
            assert int(state.num_units[module][leaf]) == units, (module, leaf)
            total_clipped, total_units = total_clipped + expected, total_units + units
    assert 0 < total_clipped < total_units  # the fixture exercises both branches
    metrics = optim.clip_fraction_metrics(state)
    np.testing.assert_allclose(metrics["agc/clip_fraction"], total_clipped / total_units, rtol=1e-6)


def test_zero_initialised_scalar_moves_by_clipping_times_eps():
    """skip_gain = 0: ‖W‖ is floored at eps, so a unit gradient is capped at λ·ε (official `SGD_AGC`)."""
    params = {"NFNet/~/nf_block": {"skip_gain": jnp.zeros(())}}
    grads = {"NFNet/~/nf_block": {"skip_gain": jnp.ones(())}}
    transform = optim.adaptive_grad_clip(CLIPPING, EPS)
    clipped, _ = transform.update(grads, transform.init(params), params)
    np.testing.assert_allclose(clipped["NFNet/~/nf_block"]["skip_gain"], CLIPPING * EPS, rtol=1e-6)


def test_update_without_params_raises_clear_error():
    params = _tree(0)
    transform = optim.adaptive_grad_clip(CLIPPING)
    with pytest.raises(ValueError, match="needs the current parameters"):
        transform.update(params, transform.init(params))


@pytest.mark.parametrize("clipping", [0.0, -1.0])
def test_non_positive_clipping_raises(clipping):
    with pytest.raises(ValueError, match="clipping must be > 0"):
        optim.adaptive_grad_clip(clipping)


def test_unknown_rank_raises_with_hint():
    with pytest.raises(ValueError, match="agc.exclude"):
        optim.adaptive_grad_clip(CLIPPING).init({"m": {"w": jnp.ones((2, 2, 2, 2, 2, 2))}})


def test_clip_fraction_found_in_nested_state_and_masked_leaves_not_counted():
    """AGC inside inject_hyperparams(chain(masked(AGC), sgd)); the classifier weight is masked out."""
    params = _tree(4)
    grads = _grads(params, 5)
    mask = optim.exclusion_mask([r"^[^/]+/~/linear/w$"])
    optimizer = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(
            optax.masked(optim.adaptive_grad_clip(CLIPPING, EPS), mask), optax.sgd(learning_rate)
        )
    )(learning_rate=0.1)
    _, state = jax.jit(optimizer.update)(grads, optimizer.init(params), params)

    groups = {"block": r"/nf_block/", "head": r"^NFNet/~/linear/", "nothing": r"^absent/"}
    metrics = optim.clip_fraction_metrics(state, groups)

    def expected_fraction(selected):
        clipped = units = 0
        for module, leaf in selected:
            leaf_clipped, leaf_units = _numpy_clips(params[module][leaf], grads[module][leaf])
            clipped, units = clipped + leaf_clipped, units + leaf_units
        return clipped / units

    every_leaf = [(m, l) for m, leaves in params.items() for l in leaves if (m, l) != ("NFNet/~/linear", "w")]
    np.testing.assert_allclose(metrics["agc/clip_fraction"], expected_fraction(every_leaf), rtol=1e-6)
    block = [(m, l) for m, l in every_leaf if "/nf_block/" in f"{m}/{l}"]
    np.testing.assert_allclose(metrics["agc/clip_fraction/block"], expected_fraction(block), rtol=1e-6)
    # Only the classifier bias is clipped in the head; its weight must not count.
    head = expected_fraction([("NFNet/~/linear", "b")])
    np.testing.assert_allclose(metrics["agc/clip_fraction/head"], head, rtol=1e-6)
    assert "agc/clip_fraction/nothing" not in metrics
    agc_paths = [path for path, _ in optim.groups.named_leaves(agc_lib.find_agc_states(state)[0].num_units)]
    assert "NFNet/~/linear/w" not in agc_paths


def test_no_agc_in_state_gives_no_metrics():
    params = _tree(0)
    optimizer = optax.sgd(0.1)
    assert optim.clip_fraction_metrics(optimizer.init(params)) == {}


def test_global_norm_is_the_frobenius_norm_of_the_whole_tree():
    tree = _tree(7, zero_skip_gain=False)
    want = np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree.leaves(tree)))
    np.testing.assert_allclose(np.asarray(agc_lib.global_norm(tree)), want, rtol=1e-6)
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)  # summed in float32, like AGC's norms
    want_bf16 = np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree.leaves(
        jax.tree.map(lambda x: np.asarray(x, np.float32), bf16))))
    np.testing.assert_allclose(np.asarray(agc_lib.global_norm(bf16)), want_bf16, rtol=1e-6)
    assert agc_lib.global_norm({}) == 0.0


def test_global_norm_beside_agc_reads_no_more_memory():
    """The step reports the norms of the gradients and params AGC clips: in one program the
    norms reuse AGC's per-unit reductions, so they add next to nothing to the bytes the program
    reads, where a whole-tensor norm (optax's) reads each kernel again (XLA's own cost model)."""
    shape = (3, 3, 48, 64)
    kernel_bytes = 4 * np.prod(shape)
    params = {"conv": {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}}
    clip = agc_lib.adaptive_grad_clip(CLIPPING, EPS)

    def bytes_accessed(norm):
        def run(grads, params):
            clipped, _ = clip.update(grads, clip.init(params), params)
            return clipped if norm is None else (clipped, norm(grads), norm(params))
        cost = jax.jit(run).lower(params, params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]

    alone = bytes_accessed(None)
    assert bytes_accessed(optax.tree.norm) - alone >= kernel_bytes  # the check can see a second pass
    assert bytes_accessed(agc_lib.global_norm) - alone < 0.05 * kernel_bytes
