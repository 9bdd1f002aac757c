"""NF-ResNet and NF-RegNet: signal propagation at init, and structure by the official rules.

(Forward-pass exactness is pinned by tests/test_golden.py; parameter counts by
tests/test_model_counts.py.)
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models
from nfnets_jax.models import layers


def abstract_params(name, x, **kwargs):
    forward = hk.transform_with_state(
        lambda images: models.create(name, 10, **kwargs)(images, is_training=False, return_features=True)
    )
    params, _ = jax.eval_shape(forward.init, jax.random.PRNGKey(0), x)
    return forward, params


@pytest.mark.slow  # over ~3 s on 2 cores: not in the `-m "not slow"` inner loop
def test_signal_propagation_tracks_expected_variance():
    """NF-ResNet paper §4 (SPPs): with unit-variance inputs, each block's output has average
    channel variance ≈ expected_std² = 1 + k·α² (reset after each transition), and each residual
    branch is variance-preserving. Checked at init (WS-standardised N(0,1) kernels, unit gains,
    zero biases) with skip gains of 1, so that the branches contribute; 224 px keeps the padding
    border of the 3×3 convs a small part of the last stage's 7×7 maps."""
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 224, 224, 3))
    kwargs = dict(width=1, skipinit_gain=jnp.ones)
    forward, shapes = abstract_params("nf_resnet50", x, **kwargs)
    rng = np.random.default_rng(0)

    def at_init(leaf, spec):
        if leaf == "w":
            return rng.standard_normal(spec.shape).astype(np.float32)
        return (np.ones if leaf in ("gain", "skip_gain") else np.zeros)(spec.shape, np.float32)

    params = {m: {leaf: at_init(leaf, s) for leaf, s in leaves.items()} for m, leaves in shapes.items()}
    feats, _ = jax.jit(lambda p, images: forward.apply(p, {}, None, images))(params, x)

    schedule = layers.block_schedule((3, 4, 6, 3), (1, 2, 2, 2), alpha=0.2, stochdepth_rate=0.0)
    expected = np.array([block.expected_std**2 for block in schedule])
    measured = np.array([np.mean(np.var(np.asarray(out), axis=(0, 1, 2))) for out in feats["block_outputs"]])
    np.testing.assert_allclose(measured, expected, rtol=0.10)
    # Variance grows by α² per block inside a stage and resets at each transition.
    assert np.all(np.diff(measured)[[0, 1, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14]] > 0)
    assert np.all(np.diff(measured)[[2, 6, 12]] < 0)
    np.testing.assert_allclose(np.asarray(feats["branch_variances"]), 1.0, atol=0.2)


def test_nf_resnet50_structure():
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    forward, params = abstract_params("nf_resnet50", x)
    # Stem: 7×7/2 WSConv to 64 channels, with a bias as in the official code.
    assert params["NF_ResNet/~/initial_conv"]["w"].shape == (7, 7, 3, 64)
    assert params["NF_ResNet/~/initial_conv"]["bias"].shape == (64,)
    # Projection shortcuts only on the stage transitions (blocks 0, 3, 7, 13).
    with_shortcut = sorted(m for m in params if m.endswith("conv_shortcut"))
    assert with_shortcut == [
        "NF_ResNet/~/nf_res_block/~/conv_shortcut",
        "NF_ResNet/~/nf_res_block_13/~/conv_shortcut",
        "NF_ResNet/~/nf_res_block_3/~/conv_shortcut",
        "NF_ResNet/~/nf_res_block_7/~/conv_shortcut",
    ]
    # Bottleneck mid = 0.25·out, 3×3 not grouped.
    assert params["NF_ResNet/~/nf_res_block_13/~/conv1"]["w"].shape == (3, 3, 512, 512)
    assert not any("squeeze_excite" in m for m in params)
    feats, _ = jax.eval_shape(lambda p, images: forward.apply(p, {}, None, images), params, x)
    spatial = [feats[k].shape[1] for k in ("stem", "stage_1", "stage_2", "stage_3", "stage_4")]
    assert spatial == [56, 56, 28, 14, 7]  # conv /2, max-pool /2, then strides 1, 2, 2, 2
    assert feats["pool"].shape == (2, 2048)


def test_nf_seresnet_has_quarter_width_se():
    _, params = abstract_params("nf_seresnet50", jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert params["NF_ResNet/~/nf_res_block/~/squeeze_excite/~/linear"]["w"].shape == (256, 64)


def test_nf_regnet_b0_structure():
    """Official `NF_RegNet`: widths ×0.75 → 36/78/156/330, expansion 1 for the very first block,
    2.25·in_ch rounded down to groups of 8 after, SE on the expanded width, final conv 960."""
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    forward, params = abstract_params("nf_regnet_b0", x)
    assert params["NF_RegNet/~/initial_conv"]["w"].shape == (3, 3, 3, 36)
    assert params["NF_RegNet/~/nf_block/~/conv0"]["w"].shape == (1, 1, 36, 32)  # int(36·1)//8·8
    assert params["NF_RegNet/~/nf_block/~/conv1"]["w"].shape == (3, 3, 8, 32)  # group width 8
    assert params["NF_RegNet/~/nf_block/~/squeeze_excite/~/linear"]["w"].shape == (32, 16)
    assert params["NF_RegNet/~/nf_block_1/~/conv0"]["w"].shape == (1, 1, 36, 80)  # int(36·2.25)=81 → 80
    assert params["NF_RegNet/~/nf_block_15/~/conv2"]["w"].shape == (1, 1, 736, 330)  # int(742.5)=742 → 92·8
    assert params["NF_RegNet/~/final_conv"]["w"].shape == (1, 1, 330, 960)
    feats, _ = jax.eval_shape(lambda p, images: forward.apply(p, {}, None, images), params, x)
    spatial = [feats[k].shape[1] for k in ("stem", "stage_1", "stage_2", "stage_3", "stage_4")]
    assert spatial == [112, 56, 28, 14, 7]  # stride 2 in the stem and in every stage
    assert [feats[f"stage_{s}"].shape[-1] for s in range(1, 5)] == [36, 78, 156, 330]
    assert len(feats["block_outputs"]) == 16
