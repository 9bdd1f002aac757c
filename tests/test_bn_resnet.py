"""The BatchNorm pre-activation ResNet baseline: standard ResNet-v2 sizes and BN state updates."""

import haiku as hk
import jax
import numpy as np
import pytest

from nfnets_jax import models
from nfnets_jax.models import registry


def resnet_v2_param_count(depths, num_classes=1000):
    """He et al. 2016 pre-activation bottleneck ResNet, counted layer by layer: 7×7 stem conv (no
    bias), per block BN(in)·conv1×1·BN·conv3×3·BN·conv1×1 (+ a 1×1 projection on transitions),
    a final BN and the classifier. Each BN has a scale and an offset."""
    total = 7 * 7 * 3 * 64
    in_ch = 64
    for depth, out_ch in zip(depths, (256, 512, 1024, 2048)):
        mid = out_ch // 4
        for index in range(depth):
            total += 2 * in_ch + in_ch * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * out_ch
            if index == 0:
                total += in_ch * out_ch
            in_ch = out_ch
    return total + 2 * 2048 + 2048 * num_classes + num_classes


def test_resnet50_v2_param_count_is_standard():
    # The familiar 25,557,032 ("25.56M") is ResNet-50 *v1*, which also batch-normalises each of
    # the 4 projection shortcuts; v2's shortcut reuses the block's pre-activation BN.
    assert resnet_v2_param_count((3, 4, 6, 3)) + 2 * (256 + 512 + 1024 + 2048) == 25_557_032
    _, params = registry.macs_and_params("bn_resnet50", 32)
    assert params == resnet_v2_param_count((3, 4, 6, 3))
    _, params = registry.macs_and_params("bn_resnet101", 32)
    assert params == resnet_v2_param_count((3, 4, 23, 3))


def test_resnet50_macs_are_standard():
    # ResNet-50 at 224 px: 4.09 GMACs (the usual "4.1 GFLOPs" figure).
    assert models.count_macs("bn_resnet50", 224) / 1e9 == pytest.approx(4.09, abs=0.01)


@pytest.mark.slow
def test_train_mode_updates_bn_state_and_eval_mode_does_not():
    forward = hk.transform_with_state(
        lambda x, train: models.create("bn_resnet50", 5, width=1, depths=(1, 1, 1, 1))(x, train)
    )
    apply = jax.jit(forward.apply, static_argnums=(4,))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) * 3.0 + 1.0
    # An eval-mode init works too: BN's moving averages are created on init whatever the mode.
    params, state = jax.jit(forward.init, static_argnums=(2,))(jax.random.PRNGKey(0), x, False)
    assert any("final_bn" in module for module in state)
    logits, new_state = apply(params, state, None, x, True)
    assert logits.shape == (4, 5)
    np.testing.assert_array_equal(logits, 0.0)  # zero-initialised classifier
    stem_bn = "ResNet/~/res_block_v2/~/bn0/~/mean_ema"
    stem = hk.transform(
        lambda i: hk.max_pool(
            hk.Conv2D(16, 7, stride=2, with_bias=False, name="initial_conv")(i), (1, 3, 3, 1), (1, 2, 2, 1), "SAME"
        )
    )
    stem_params = {"initial_conv": params["ResNet/~/initial_conv"]}
    mean_1 = np.asarray(stem.apply(stem_params, None, x)).mean(axis=(0, 1, 2))
    x2 = jax.random.normal(jax.random.PRNGKey(2), x.shape) - 2.0
    mean_2 = np.asarray(stem.apply(stem_params, None, x2)).mean(axis=(0, 1, 2))
    # Haiku's zero-debiased EMA with decay 0.9: m1 after one step, (0.9·0.1·m1 + 0.1·m2)/(1 − 0.9²) after two.
    np.testing.assert_allclose(new_state[stem_bn]["average"].ravel(), mean_1, rtol=1e-4, atol=1e-5)
    _, state_2 = apply(params, new_state, None, x2, True)
    want = (0.9 * 0.1 * mean_1 + 0.1 * mean_2) / (1 - 0.9**2)
    np.testing.assert_allclose(state_2[stem_bn]["average"].ravel(), want, rtol=1e-4, atol=1e-4)
    _, eval_state = apply(params, state_2, None, x, False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, eval_state, state_2)
