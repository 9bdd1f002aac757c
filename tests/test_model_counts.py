"""Parameter and MAC counts against DeepMind's published numbers; the registry's tables.

Expectations: the official parameter counts of all 16 NFNet variants and the official
`count_flops` MACs (measured by running DeepMind's code, tests/data/official_nfnet_facts.json),
the paper's Table 3 #FLOPs, and the official code's counts for NF-ResNets / NF-RegNets (0.01M
rounding; docs/paper_numbers.md).
"""

import json
import pathlib
import re

import haiku as hk
import jax
import jax.numpy as jnp
import pytest

from nfnets_jax import models
from nfnets_jax.models import registry

FACTS = json.loads((pathlib.Path(__file__).parent / "data" / "official_nfnet_facts.json").read_text())

# The paper's Table 3, "#FLOPs" (billions of MACs at the test resolution).
PAPER_TABLE3_GMACS = {"F0": 12.38, "F1": 35.54, "F2": 62.59, "F3": 114.76, "F4": 215.24, "F5": 289.76, "F6": 377.28}
# Paper Table 1 / official `base.py:nfnet_params`: (train px, test px, dropout, RandAugment magnitude).
PAPER_TABLE1 = {
    "F0": (192, 256, 0.2, 5),
    "F1": (224, 320, 0.3, 10),
    "F2": (256, 352, 0.4, 10),
    "F3": (320, 416, 0.4, 15),
    "F4": (384, 512, 0.5, 15),
    "F5": (416, 544, 0.5, 15),
    "F6": (448, 576, 0.5, 15),
    "F7": (480, 608, 0.5, 15),
}
# Measured with the official code (`hk.transform` + `jax.eval_shape`, 1000 classes), in millions.
NF_RESNET_MPARAMS = {"50": 25.56, "101": 44.55, "152": 60.19, "200": 64.67, "288": 146.46}
NF_SERESNET_MPARAMS = {"50": 35.64, "101": 63.56, "152": 86.57, "200": 93.15, "288": 213.42}
NF_REGNET_MPARAMS = {
    "b0": 8.60, "b1": 10.02, "b2": 13.79, "b3": 18.14, "b4": 29.32,
    "b5": 48.71, "b6": 70.05, "b7": 101.74, "b8": 142.31,
}  # fmt: skip


def _registry_name(variant: str) -> str:
    return f"nfnet_{variant.lower().replace('+', 'plus')}"


@pytest.mark.slow  # 16 full-size abstract inits and MAC counts, ~2-4 s each
@pytest.mark.parametrize("variant", list(FACTS["param_counts_all_variants"]))
def test_nfnet_params_and_macs_equal_official(variant):
    name = _registry_name(variant)
    macs, params = registry.macs_and_params(name, models.variant_info(name)["test_imsize"])
    assert params == FACTS["param_counts_all_variants"][variant]
    assert macs == FACTS["count_flops_macs_at_test_imsize"][variant]
    if variant in PAPER_TABLE3_GMACS:
        assert macs / 1e9 == pytest.approx(PAPER_TABLE3_GMACS[variant], rel=0.01)


def test_count_macs_at_train_resolution_f0():
    # Official count_flops at 192 px: 6.977 GMACs (`nfnet.py:NFNet.count_flops`).
    assert models.count_macs("nfnet_f0", 192) == 6_977_003_520


@pytest.mark.parametrize(
    "name,mparams",
    [(f"nf_resnet{d}", m) for d, m in NF_RESNET_MPARAMS.items()]
    + [(f"nf_seresnet{d}", m) for d, m in NF_SERESNET_MPARAMS.items()]
    + [(f"nf_regnet_{b}", m) for b, m in NF_REGNET_MPARAMS.items()],
)
def test_nf_resnet_and_regnet_params_equal_official(name, mparams):
    _, params = registry.macs_and_params(name, 32)
    assert params / 1e6 == pytest.approx(mparams, abs=0.005)


def test_variant_info_is_table1():
    for variant, (train_px, test_px, drop, magnitude) in PAPER_TABLE1.items():
        for suffix in ("", "plus"):
            info = models.variant_info(f"nfnet_{variant.lower()}{suffix}")
            assert (info["train_imsize"], info["test_imsize"], info["drop_rate"]) == (train_px, test_px, drop)
            assert info["randaugment_magnitude"] == magnitude
            assert info["stochdepth_rate"] == 0.25
    b3 = models.variant_info("nf_regnet_b3")
    assert (b3["train_imsize"], b3["test_imsize"], b3["drop_rate"], b3["randaugment_magnitude"]) == (288, 320, 0.3, None)


def test_list_models_and_unknown_name():
    names = models.list_models()
    expected = (
        [f"nfnet_f{k}" for k in range(8)]
        + [f"nfnet_f{k}plus" for k in range(8)]
        + [f"nf_resnet{d}" for d in (50, 101, 152, 200, 288, 600)]
        + [f"nf_seresnet{d}" for d in (50, 101, 152, 200, 288, 600)]
        + [f"nf_regnet_b{k}" for k in range(9)]
        + [f"bn_resnet{d}" for d in (50, 101, 152, 200)]
    )
    assert sorted(names) == sorted(expected)
    with pytest.raises(ValueError, match="Valid names: .*nfnet_f3plus.*nf_regnet_b0"):
        models.create("nfnet_f3+", 10)
    with pytest.raises(ValueError, match="Valid names"):
        models.variant_info("resnet50")


@pytest.mark.parametrize("name", ["nf_resnet50", "nf_seresnet101", "nf_regnet_b2", "bn_resnet50"])
def test_stage_regexes_partition_every_family(name):
    """Each parameter path matches exactly one label; each stage holds its variant's blocks."""
    forward = hk.transform_with_state(lambda x: models.create(name, 10)(x, is_training=True))
    params, _ = jax.eval_shape(forward.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    regexes = models.stage_regexes(name)
    blocks_per_stage = dict.fromkeys(regexes, 0)
    for module, leaves in params.items():
        for leaf in leaves:
            labels = [label for label, rx in regexes.items() if re.search(rx, f"{module}/{leaf}")]
            assert len(labels) == 1, (module, leaf, labels)
            # One skip_gain per NF block; one bn0 per BN-ResNet block.
            if leaf == "skip_gain" or (module.endswith("/bn0") and leaf == "scale"):
                blocks_per_stage[labels[0]] += 1
    family = registry._MODELS[name][0]
    depths = family.variants[registry._MODELS[name][1]["variant"]].depths
    assert [blocks_per_stage[f"stage_{s}"] for s in range(1, 5)] == list(depths)


def test_model_table_row_is_computed():
    from experiments import model_table

    table = model_table.markdown_table(["nfnet_f0"])
    assert table.splitlines()[-1] == "| `nfnet_f0` | 71.49M | 12.38B | 192 | 256 |"
