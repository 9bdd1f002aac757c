"""NFNet: DeepMind's exact F0 parameter tree, the tiny CPU model, features, pmap, stage regexes."""

import json
import pathlib
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models

FACTS = json.loads((pathlib.Path(__file__).parent / "data" / "official_nfnet_facts.json").read_text())
TINY = dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), group_size=8, stem_channels=(8, 8, 8, 8))


def init_shapes(name, imsize=32, **kwargs):
    forward = hk.transform_with_state(lambda x: models.create(name, 1000, **kwargs)(x, is_training=False))
    params, _ = jax.eval_shape(forward.init, jax.random.PRNGKey(0), jnp.zeros((1, imsize, imsize, 3)))
    return params


def test_f0_tree_is_deepminds():
    """Every module name, leaf name and shape of F0 equals the official tree (233 leaves)."""
    params = init_shapes("nfnet_f0")
    ours = {module: {leaf: list(v.shape) for leaf, v in leaves.items()} for module, leaves in params.items()}
    assert ours == FACTS["params"]
    assert len(ours) == FACTS["num_modules"] == 94
    assert sum(len(leaves) for leaves in ours.values()) == FACTS["num_leaves"]
    assert models.count_params(params) == FACTS["total_params"] == 71_489_284


def test_width_scales_blocks_but_not_the_stem():
    params = init_shapes("nfnet_f0", width=2.0)
    assert params["NFNet/~/stem_conv3"]["w"].shape == (3, 3, 64, 128)
    assert params["NFNet/~/nf_block/~/conv2"]["w"].shape == (1, 1, 256, 512)
    # Group width stays 128: the grouped kernel's input depth is 128 whatever the width.
    assert params["NFNet/~/nf_block_4/~/conv1"]["w"].shape == (3, 3, 128, 1536)
    assert params["NFNet/~/final_conv"]["w"].shape == (1, 1, 3072, 6144)


def tiny_forward(**extra):
    """The tiny NFNet of the CPU demo (one extra stage-2 block, to see an identity shortcut), as a
    jitted (init, apply) pair: eager XLA:CPU is slow."""
    kwargs = {**TINY, "depths": (1, 2, 1, 1), **extra}
    forward = hk.transform_with_state(
        lambda x, train, feats=False: models.create("nfnet_f0", 10, **kwargs)(x, train, return_features=feats)
    )
    return hk.TransformedWithState(
        init=jax.jit(forward.init, static_argnums=(2,)), apply=jax.jit(forward.apply, static_argnums=(4, 5))
    )


@pytest.fixture(scope="module")
def tiny():
    """(forward, params, state, x): one real `init` shared by the tests (compiling it takes ~5 s)."""
    forward = tiny_forward()
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    params, state = forward.init(jax.random.PRNGKey(0), x, False)
    return forward, params, state, x


def test_tiny_forward_smoke_gives_finite_logits(tiny):
    forward, params, state, x = tiny
    logits, _ = forward.apply(params, state, None, x, False)
    assert logits.shape == (4, 10)
    assert np.all(np.isfinite(logits))


def test_features_dict_shapes_and_skipinit_identity(tiny):
    forward, params, state, x = tiny
    feats, _ = forward.apply(params, state, None, x, False, True)
    assert feats["stem"].shape == (4, 8, 8, 8)  # stem ×4 downsampling
    assert feats["stage_1"].shape == (4, 8, 8, 16)
    assert feats["stage_2"].shape == (4, 4, 4, 32)
    assert feats["stage_3"].shape == (4, 2, 2, 64)
    assert feats["stage_4"].shape == (4, 1, 1, 64)
    assert feats["pool"].shape == (4, 128)  # final conv ×2
    assert len(feats["block_outputs"]) == len(feats["branch_variances"]) == 5
    # skip_gain is 0 at init, so a non-transition block returns its input unchanged (SkipInit).
    np.testing.assert_array_equal(feats["block_outputs"][2], feats["block_outputs"][1])
    # Classifier: pool @ w + b, with the logits as the default return.
    fc = params["NFNet/~/linear"]
    np.testing.assert_allclose(feats["logits"], feats["pool"] @ fc["w"] + fc["b"], rtol=1e-5, atol=1e-6)
    logits, _ = forward.apply(params, state, None, x, False)
    np.testing.assert_allclose(logits, feats["logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_training_needs_rng_and_applies_dropout(tiny):
    _, params, state, x = tiny
    forward = tiny_forward(drop_rate=0.5)
    with pytest.raises(ValueError):
        forward.apply(params, state, None, x, True, True)
    feats_train, _ = forward.apply(params, state, jax.random.PRNGKey(3), x, True, True)
    feats_eval, _ = forward.apply(params, state, None, x, False, True)
    # pool is taken before dropout, so it agrees; the logits see dropout.
    np.testing.assert_allclose(feats_train["pool"], feats_eval["pool"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(feats_train["logits"], feats_eval["logits"])


@pytest.mark.slow  # over ~3 s on 2 cores: not in the `-m "not slow"` inner loop
def test_pmap_over_two_devices_equals_single_device(tiny):
    forward, params, state, x = tiny
    single, _ = forward.apply(params, state, None, x, False)
    devices = jax.devices()[:2]
    replicate = lambda tree: jax.tree_util.tree_map(lambda a: np.stack([a] * len(devices)), tree)  # noqa: E731
    sharded, _ = jax.pmap(lambda p, s, images: forward.apply(p, s, None, images, False), devices=devices)(
        replicate(params), replicate(state), x.reshape(2, 2, *x.shape[1:])
    )
    np.testing.assert_allclose(np.asarray(sharded).reshape(4, 10), single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, TINY, {**TINY, "depths": (2, 3, 1, 2)}])
def test_stage_regexes_partition_the_parameters(kwargs):
    params = init_shapes("nfnet_f0", **kwargs)
    regexes = models.stage_regexes("nfnet_f0", **kwargs)
    assert list(regexes) == ["stem", "stage_1", "stage_2", "stage_3", "stage_4", "head"]
    depths = kwargs.get("depths", (1, 2, 6, 3))
    counts = dict.fromkeys(regexes, 0)
    for module, leaves in params.items():
        for leaf in leaves:
            path = f"{module}/{leaf}"
            labels = [label for label, rx in regexes.items() if re.search(rx, path)]
            assert len(labels) == 1, (path, labels)
            counts[labels[0]] += 1
            if leaf == "skip_gain":
                counts[labels[0] + "/blocks"] = counts.get(labels[0] + "/blocks", 0) + 1
    assert [counts[f"stage_{s}/blocks"] for s in range(1, 5)] == list(depths)
    assert counts["stem"] == 12 and counts["head"] == 5


def test_f0_stage_regex_examples():
    regexes = models.stage_regexes("nfnet_f0")
    assert re.search(regexes["stage_1"], "NFNet/~/nf_block/~/conv0/w")
    assert not re.search(regexes["stage_1"], "NFNet/~/nf_block_1/~/conv0/w")
    assert re.search(regexes["stage_4"], "NFNet/~/nf_block_11/skip_gain")
    assert re.search(regexes["stage_3"], "NFNet/~/nf_block_3/~/conv1b/gain")
    assert re.search(regexes["head"], "NFNet/~/linear/w")


def test_user_errors_are_explained():
    with pytest.raises(ValueError, match="nfnet_f0"):
        models.create("nfnet_f9", 10)
    with pytest.raises(ValueError, match="group_size"):
        hk.transform(lambda x: models.create("nfnet_f0", 10, **{**TINY, "group_size": 64})(x, False)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
        )
    with pytest.raises(ValueError, match="NHWC"):
        hk.transform(lambda x: models.create("nfnet_f0", 10, **TINY)(x, False)).init(
            jax.random.PRNGKey(0), jnp.zeros((32, 32, 3))
        )
    with pytest.raises(ValueError, match="fixes"):
        models.create("nfnet_f0", 10, variant="F1")
