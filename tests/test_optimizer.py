"""The NFNet optimizer chain: config, parameter groups, schedule and the official update rule."""

import math
import warnings

import ml_collections
import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from nfnets_jax import optim


def _f0_like_params():
    """F0's 233 parameter paths (docs/official_code_notes.md) with tiny shapes.

    Stem: 4 convs. 12 blocks (stage depths 1, 2, 6, 3); the first block of each stage is a
    transition with a conv_shortcut. Head: final_conv and the classifier `linear`.
    """
    conv = lambda: {"w": np.ones((1, 1, 2, 2), np.float32), "gain": np.ones(2, np.float32),
                    "bias": np.zeros(2, np.float32)}
    linear = lambda: {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    params = {f"NFNet/~/stem_conv{i}": conv() for i in range(4)}
    transitions = {0, 1, 3, 9}
    for index in range(12):
        block = "NFNet/~/nf_block" + (f"_{index}" if index else "")
        params[block] = {"skip_gain": np.zeros((), np.float32)}
        for name in ("conv0", "conv1", "conv1b", "conv2") + (("conv_shortcut",) if index in transitions else ()):
            params[f"{block}/~/{name}"] = conv()
        params[f"{block}/~/squeeze_excite/~/linear"] = linear()
        params[f"{block}/~/squeeze_excite/~/linear_1"] = linear()
    params["NFNet/~/final_conv"] = conv()
    params["NFNet/~/linear"] = linear()
    return params


def _official_groups(module, leaf):
    """The official predicates (`experiment_nfnets.py:_make_opt`), independent of our regexes."""
    gain_or_bias = leaf in ("scale", "offset", "b") or "gain" in leaf or "bias" in leaf
    classifier_weight = "linear" in module and "squeeze_excite" not in module and not gain_or_bias
    return (not classifier_weight), (not gain_or_bias)  # (gets AGC, gets weight decay)


def _parse_description(text):
    rows = {}
    for line in text.splitlines()[3:]:
        path, *_, agc_flag, wd_flag = line.split()
        rows[path] = (agc_flag == "clip", wd_flag == "decay")
    return rows


def test_default_config_is_the_paper_recipe():
    config = optim.default_optimizer_config()
    assert (config.name, config.lr, config.lr_scale_by_batch, config.warmup_epochs) == ("sgd", 0.1, True, 5)
    assert (config.schedule, config.min_lr, config.momentum, config.nesterov) == ("cosine", 0.0, 0.9, True)
    assert (config.weight_decay, config.agc.clipping, config.agc.eps) == (2e-5, 0.01, 1e-3)
    assert (config.sam.rho, config.sam.ascent_fraction, config.sam.sync_ascent) == (None, 0.2, False)
    assert config.ema_decay == 0.99999


def test_default_groups_match_deepmind_counts_on_the_f0_tree():
    """F0: 151 gains/biases without decay, 1 tensor (classifier w) without AGC, 81 with both."""
    params = _f0_like_params()
    assert len(jax.tree.leaves(params)) == 233
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults must match something in an NFNet
        rows = _parse_description(optim.describe_param_groups(optim.default_optimizer_config(), params))
    assert len(rows) == 233
    for path, flags in rows.items():
        module, leaf = path.rsplit("/", 1)
        assert flags == _official_groups(module, leaf), path
    assert sum(not wd for _, wd in rows.values()) == 151
    assert [path for path, (agc, _) in rows.items() if not agc] == ["NFNet/~/linear/w"]
    assert sum(agc and wd for agc, wd in rows.values()) == 81


def test_default_wd_exclusion_is_the_official_leaf_name_predicate():
    """'gain' or 'bias' anywhere in the leaf name (not only at its end), never in the module."""
    leaves = ["w", "b", "scale", "offset", "gain", "skip_gain", "bias", "bias_hh", "gain_2", "bw", "wb"]
    params = {"NFNet/~/gain_bias_module": {leaf: np.zeros(1) for leaf in leaves}}
    mask = optim.exclusion_mask(optim.config.DEFAULT_WD_EXCLUDE)(params)
    for leaf in leaves:
        assert mask["NFNet/~/gain_bias_module"][leaf] == _official_groups("NFNet/~/x", leaf)[1], leaf


def test_unmatched_pattern_warns():
    config = optim.default_optimizer_config()
    config.agc.exclude = [r"^[^/]+/~/logits/w$"]
    with pytest.warns(UserWarning, match="logits"):
        text = optim.describe_param_groups(config, _f0_like_params())
    assert "WARNING optimizer.agc.exclude" in text


def _nfnet_like_tree(seed):
    rng = np.random.default_rng(seed)
    shapes = {
        "NFNet/~/stem_conv0": {"w": (3, 3, 2, 4), "gain": (4,), "bias": (4,)},
        "NFNet/~/nf_block": {"skip_gain": ()},
        "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": (4, 2), "b": (2,)},
        "NFNet/~/linear": {"w": (4, 3), "b": (3,)},
    }
    return {
        module: {
            leaf: np.asarray(rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 0), np.float32)
            for leaf, shape in leaves.items()
        }
        for module, leaves in shapes.items()
    }


def _numpy_official_steps(params, grads_per_step, lrs, *, clipping, eps, weight_decay, momentum):
    """Official `optim.py:SGD_AGC.update_param`, written out in float64 NumPy, tensor by tensor."""
    params = {m: {l: np.asarray(v, np.float64) for l, v in leaves.items()} for m, leaves in params.items()}
    buffers = {m: {l: np.zeros_like(v) for l, v in leaves.items()} for m, leaves in params.items()}
    for grads, lr in zip(grads_per_step, lrs):
        for module, leaves in params.items():
            for leaf, w in leaves.items():
                g = np.asarray(grads[module][leaf], np.float64)
                gets_agc, gets_wd = _official_groups(module, leaf)
                if gets_agc:  # a. unit-wise clip
                    if np.squeeze(w).ndim <= 1:
                        axes, keep = None, False
                    else:
                        axes, keep = ((0,) if w.ndim == 2 else (0, 1, 2)), True
                    w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=keep))
                    g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=keep))
                    max_norm = clipping * np.maximum(w_norm, eps)
                    g = np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)
                if gets_wd:  # b. coupled weight decay, never clipped
                    g = g + weight_decay * w
                buffers[module][leaf] = momentum * buffers[module][leaf] + g  # c. buf ← m·buf + g
                g = g + momentum * buffers[module][leaf]  # d. Nesterov
                leaves[leaf] = w - lr * g  # e.
    return params


@pytest.mark.slow  # over ~3 s on 2 cores: not in the `-m "not slow"` inner loop
def test_three_steps_match_the_official_update_rule_in_numpy():
    config = optim.default_optimizer_config()
    config.agc.clipping = 0.05
    config.weight_decay = 1e-2  # large enough that a wrong mask would show at 1e-6
    config.warmup_epochs = 1
    steps_per_epoch, total_steps, batch_size = 2, 10, 512
    optimizer = optim.make_optimizer(
        config, steps_per_epoch=steps_per_epoch, total_steps=total_steps, batch_size=batch_size
    )
    params = _nfnet_like_tree(0)
    grads_per_step = [_nfnet_like_tree(seed) for seed in (1, 2, 3)]
    # Peak 0.1·512/256 = 0.2, warmup over 2 steps from 0: lr(0) = 0, lr(1) = 0.1, lr(2) = 0.2.
    lrs = [0.0, 0.1, 0.2]

    state = optimizer.init(params)
    current = jax.tree.map(jnp.asarray, params)
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, current)
        current = optax.apply_updates(current, updates)

    expected = _numpy_official_steps(
        params, grads_per_step, lrs, clipping=0.05, eps=1e-3, weight_decay=1e-2, momentum=0.9
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), current, expected)
    assert 0 < float(optim.clip_fraction_metrics(state)["agc/clip_fraction"]) < 1


def test_schedule_reproduces_the_official_imagenet_schedule():
    """Batch 4096, 1,281,167 images, 112,602 steps: warmup 1563.92 steps (fractional) to 1.6."""
    config = optim.default_optimizer_config()
    steps_per_epoch = 1281167 / 4096
    schedule = optim.make_lr_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=112602, batch_size=4096)
    warmup = 5 * steps_per_epoch

    def official(t):
        if t <= warmup:
            return 1.6 * t / warmup
        return 0.8 * (1 + math.cos(math.pi * (t - warmup) / (112602 - warmup)))

    for t in [0, 1, 781, 1563, 1564, 2000, 56000, 112601, 112602]:
        np.testing.assert_allclose(float(schedule(t)), official(t), rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
    assert float(schedule(0)) == 0.0
    assert float(schedule(200000)) == pytest.approx(0.0, abs=1e-7)


def test_constant_schedule_and_min_lr():
    config = optim.default_optimizer_config()
    config.update({"schedule": "constant", "lr_scale_by_batch": False, "warmup_epochs": 2})
    schedule = optim.make_lr_schedule(config, steps_per_epoch=4, total_steps=100, batch_size=1024)
    np.testing.assert_allclose([float(schedule(t)) for t in (0, 4, 8, 50)], [0.0, 0.05, 0.1, 0.1], rtol=1e-6)
    config.update({"schedule": "cosine", "min_lr": 0.01})
    schedule = optim.make_lr_schedule(config, steps_per_epoch=4, total_steps=108, batch_size=1024)
    np.testing.assert_allclose(float(schedule(58)), 0.01 + 0.09 * 0.5, rtol=1e-6)  # half-way through the cosine
    np.testing.assert_allclose(float(schedule(108)), 0.01, rtol=1e-6)


def test_schedule_with_traced_settings_is_the_closed_form_and_the_checked_schedule():
    """`warmup_cosine_at` inside jit, its peak, warmup and length traced (as `analysis.in_memory_training`
    trains runs of different lengths in one program): the closed form, and `warmup_cosine`'s values."""
    traced = jax.jit(optim.schedules.warmup_cosine_at)
    checked = optim.schedules.warmup_cosine(0.8, 5, 40)

    def closed_form(t):
        return 0.8 * t / 5 if t < 5 else 0.4 * (1 + math.cos(math.pi * min(t - 5, 35) / 35))

    for t in (0, 3, 5, 17, 39, 40, 45):
        got = float(traced(jnp.float32(t), jnp.float32(0.8), jnp.float32(5), jnp.float32(40)))
        assert got == pytest.approx(closed_form(t), rel=1e-6, abs=1e-7), t
        assert got == pytest.approx(float(checked(t)), rel=1e-6, abs=1e-7), t


def _no_classifier_weight(tree):
    return {m: {l: not (m == "NFNet/~/linear" and l == "w") for l in ls} for m, ls in tree.items()}


def _weights_only(tree):
    return {m: {l: _official_groups(m, l)[1] for l in ls} for m, ls in tree.items()}


def _run(optimizer, params, grads_per_step):
    state = optimizer.init(params)
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _constant_lr_config(name, **extra):
    config = optim.default_optimizer_config()
    config.update({"name": name, "lr": 1e-3, "lr_scale_by_batch": False, "warmup_epochs": 0,
                   "schedule": "constant", **extra})
    return config


@pytest.mark.slow  # over ~3 s on 2 cores: not in the `-m "not slow"` inner loop
def test_adamw_keeps_agc_and_hands_it_the_decay_mask():
    config = _constant_lr_config("adamw", base_kwargs={"b1": 0.8})
    optimizer = optim.make_optimizer(config, steps_per_epoch=1, total_steps=10, batch_size=256)
    reference = optax.chain(
        optax.masked(optax.adaptive_grad_clip(0.01, 1e-3), _no_classifier_weight),
        optax.adamw(1e-3, b1=0.8, weight_decay=2e-5, mask=_weights_only),
    )
    params = jax.tree.map(jnp.asarray, _nfnet_like_tree(0))
    grads = [_nfnet_like_tree(seed) for seed in (1, 2, 3)]
    # The factory's adamw keeps b1, b2, ... as float32 arrays in its state (inject_hyperparams),
    # the reference as Python floats: they round differently, by ~1e-5 of an lr-sized step.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        _run(optimizer, params, grads),
        _run(reference, params, grads),
    )
    assert optim.agc.find_agc_states(optimizer.init(params))


def test_optimizer_without_own_decay_gets_coupled_masked_decay():
    config = _constant_lr_config("adam", weight_decay=1e-2)
    optimizer = optim.make_optimizer(config, steps_per_epoch=1, total_steps=10, batch_size=256)
    reference = optax.chain(
        optax.masked(optax.adaptive_grad_clip(0.01, 1e-3), _no_classifier_weight),
        optax.masked(optax.add_decayed_weights(1e-2), _weights_only),
        optax.adam(1e-3),
    )
    params = jax.tree.map(jnp.asarray, _nfnet_like_tree(0))
    grads = [_nfnet_like_tree(seed) for seed in (1, 2)]
    jax.tree.map(  # atol: float32 hyperparameters in the state, as in the adamw test above
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        _run(optimizer, params, grads),
        _run(reference, params, grads),
    )


def test_agc_and_weight_decay_can_be_switched_off():
    config = _constant_lr_config("sgd", weight_decay=0.0, momentum=0.0)
    config.agc.clipping = None
    optimizer = optim.make_optimizer(config, steps_per_epoch=1, total_steps=10, batch_size=256)
    params = jax.tree.map(jnp.asarray, _nfnet_like_tree(0))
    grads = _nfnet_like_tree(1)
    expected = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), _run(optimizer, params, [grads]), expected)
    assert optim.clip_fraction_metrics(optimizer.init(params)) == {}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "sgdd"}, "not an optax optimizer"),
        ({"lr": -0.1}, "optimizer.lr"),
        ({"schedule": "linear"}, "optimizer.schedule"),
        ({"min_lr": 0.2}, "peak LR = 0.1"),
        ({"momentum": 1.0}, "optimizer.momentum"),
        ({"weight_decay": -1.0}, "optimizer.weight_decay"),
        ({"wd_exclude": ["(unclosed"]}, "does not compile"),
        ({"wd_exclude": "gain$"}, "list of regular expressions"),
        ({"agc": {"exclude": ["[bad"]}}, "optimizer.agc.exclude"),
        ({"agc": {"clipping": -0.01}}, "optimizer.agc.clipping"),
        ({"sam": {"rho": 0.05, "ascent_fraction": 0.0}}, "ascent_fraction"),
        ({"sam": {"ascent_fraction": 1.5}}, "ascent_fraction"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"weight_dcay": 1e-5}, "Unknown optimizer config field"),
        ({"agc": {"clip": 0.01}}, "Unknown optimizer.agc field"),
        # Would otherwise be a TypeError ("multiple values for keyword argument 'momentum'").
        ({"base_kwargs": {"momentum": 0.5}}, r"must not set \['momentum'\] for 'sgd': set optimizer.momentum"),
    ],
)
def test_bad_config_raises_clear_error(overrides, message):
    config = optim.default_optimizer_config().to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(ml_collections.ConfigDict(config), steps_per_epoch=10, total_steps=100, batch_size=256)


def test_warmup_longer_than_training_and_reserved_base_kwargs_raise():
    config = optim.default_optimizer_config()
    with pytest.raises(ValueError, match="warmup_epochs"):
        optim.make_optimizer(config, steps_per_epoch=10, total_steps=40, batch_size=256)
    config = _constant_lr_config("adamw", base_kwargs={"weight_decay": 0.1})
    with pytest.raises(ValueError, match="base_kwargs must not set"):
        optim.make_optimizer(config, steps_per_epoch=10, total_steps=40, batch_size=256)


def test_partial_config_takes_defaults():
    optimizer = optim.make_optimizer({"lr": 0.2}, steps_per_epoch=10, total_steps=100, batch_size=256)
    state = optimizer.init(_nfnet_like_tree(0))
    assert len(optim.agc.find_agc_states(state)) == 1


def test_partial_configdict_section_inside_a_dict_takes_defaults():
    """Regression: a ConfigDict section in a plain dict replaced the whole section, so eps and
    exclude were lost and the first read raised a bare AttributeError('eps')."""
    config = optim.validate_optimizer_config({"agc": ml_collections.ConfigDict({"clipping": 0.02})})
    assert (config.agc.clipping, config.agc.eps) == (0.02, 1e-3)
    assert list(config.agc.exclude) == list(optim.config.DEFAULT_AGC_EXCLUDE)
    with pytest.raises(ValueError, match=r"optimizer.agc must be a section .* optimizer.agc.clipping = 0.01"):
        optim.validate_optimizer_config({"agc": 0.01})


@pytest.mark.parametrize("model_name", ["nfnet_f0", "nf_seresnet50", "nf_regnet_b0", "bn_resnet50"])
def test_default_groups_on_every_model_family(model_name):
    """The default patterns pick out each family's classifier weight and the official WD set."""
    import haiku as hk  # pylint: disable=import-outside-toplevel

    from nfnets_jax import models  # pylint: disable=import-outside-toplevel

    forward = hk.transform_with_state(lambda x: models.create(model_name, num_classes=10)(x, is_training=True))
    params, _ = jax.eval_shape(forward.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = _parse_description(optim.describe_param_groups(optim.default_optimizer_config(), params))
    top_scope = next(iter(rows)).split("/")[0]
    assert [path for path, (agc, _) in rows.items() if not agc] == [f"{top_scope}/~/linear/w"]
    for path, (_, wd) in rows.items():
        module, leaf = path.rsplit("/", 1)
        assert wd == _official_groups(module, leaf)[1], path
