"""NFNet with `norm="batchnorm"`: the same architecture as the NF default, normalised by
BatchNorm (the "+BN" baseline of the paper's ablations). Checked on a tiny NFNet: the conv
weights have the same shapes as the NF model's (same architecture), the NF-only parameters are
gone, BN statistics are Haiku state, and training-mode outputs depend on the batch (BN) where
the NF model's do not."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models

TINY = dict(depths=(1, 1, 1, 1), widths=(16, 16, 32, 32), group_size=8, stem_channels=(4, 4, 8, 8),
            stochdepth_rate=0.0, drop_rate=0.0)


def _init(norm):
    forward = hk.transform_with_state(
        lambda x, is_training: models.create("nfnet_f0", num_classes=5, norm=norm, **TINY)(x, is_training))
    images = jax.random.normal(jax.random.PRNGKey(1), (6, 16, 16, 3))
    params, state = forward.init(jax.random.PRNGKey(0), images, True)
    return forward, params, state, images


def _conv_kernels(params):
    return {f"{module}/{name}": value.shape for module, leaves in params.items() for name, value in leaves.items()
            if name == "w" and "squeeze_excite" not in module and "linear" not in module}


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_same_conv_architecture_and_norm_only_parameters():
    _, nf_params, nf_state, _ = _init("none")
    _, bn_params, bn_state, _ = _init("batchnorm")
    assert _conv_kernels(bn_params) == _conv_kernels(nf_params)
    nf_leaves = {name for leaves in nf_params.values() for name in leaves}
    bn_leaves = {name for leaves in bn_params.values() for name in leaves}
    assert "gain" in nf_leaves and "gain" not in bn_leaves  # no Scaled WS gains
    assert {"scale", "offset"} <= bn_leaves and not {"scale", "offset"} & nf_leaves
    assert not nf_state and bn_state  # BN moving averages are state; NF has none
    # 3 BNs in the stem, 4 per block (before each activation), 1 before the head's activation.
    bn_modules = {module for module in bn_params if module.rsplit("/", 1)[-1].startswith(("bn", "stem_bn", "final_bn"))}
    assert len(bn_modules) == 3 + 4 * 4 + 1


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_batchnorm_outputs_depend_on_the_batch_nf_outputs_do_not():
    for norm, depends in (("none", False), ("batchnorm", True)):
        forward, params, state, images = _init(norm)
        full, _ = forward.apply(params, state, None, images, True)
        half, _ = forward.apply(params, state, None, images[:3], True)
        assert np.allclose(full[:3], half, rtol=1e-4, atol=1e-9) != depends, norm


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="Unknown norm"):
        hk.transform(lambda x: models.create("nfnet_f0", num_classes=5, norm="layernorm", **TINY)(x, False)).init(
            jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))
