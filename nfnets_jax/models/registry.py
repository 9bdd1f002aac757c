"""Model names → constructors, variant facts, per-stage parameter regexes, and counters.

One table (`_MODELS`) says, for every public name, which class builds it with which fixed
arguments; everything else (`create`, `variant_info`, `stage_regexes`, `count_macs`) reads it.
Names: `nfnet_f0`…`nfnet_f7`, `nfnet_f0plus`…`nfnet_f7plus`, `nf_resnet50`…`nf_resnet600`,
`nf_seresnet50`…`nf_seresnet600` (with SE), `nf_regnet_b0`…`nf_regnet_b8`,
`bn_resnet50`…`bn_resnet200` (docs/CONTRACTS.md, models section).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.models import bn_resnet, flops, nf_regnet, nf_resnet, nfnet


@dataclasses.dataclass(frozen=True)
class _Family:
    """How one model family names its modules (for `stage_regexes`) and where its facts live."""

    module: type[hk.Module]
    scope: str  # Haiku top-level name.
    block: str  # Haiku base name of a residual block: `block`, `block_1`, ….
    stem: str  # Regex (after `scope/~/`) of the stem modules.
    head: str  # Regex (after `scope/~/`) of the head modules.
    variants: Mapping[str, Any]


_NFNET = _Family(nfnet.NFNet, "NFNet", "nf_block", r"stem_conv\d+", r"(?:final_conv|linear)", nfnet.NFNET_VARIANTS)
_NF_RESNET = _Family(
    nf_resnet.NFResNet, "NF_ResNet", "nf_res_block", "initial_conv", "linear", nf_resnet.NF_RESNET_VARIANTS
)
_NF_REGNET = _Family(
    nf_regnet.NFRegNet, "NF_RegNet", "nf_block", "initial_conv", r"(?:final_conv|linear)", nf_regnet.NF_REGNET_VARIANTS
)
_BN_RESNET = _Family(
    bn_resnet.BNResNet, "ResNet", "res_block_v2", "initial_conv", r"(?:final_bn|linear)", bn_resnet.BN_RESNET_VARIANTS
)


def _build_table() -> dict[str, tuple[_Family, dict[str, Any]]]:
    table: dict[str, tuple[_Family, dict[str, Any]]] = {}
    for k in range(8):
        table[f"nfnet_f{k}"] = (_NFNET, {"variant": f"F{k}"})
    for k in range(8):
        table[f"nfnet_f{k}plus"] = (_NFNET, {"variant": f"F{k}+"})
    for depth in (50, 101, 152, 200, 288, 600):
        table[f"nf_resnet{depth}"] = (_NF_RESNET, {"variant": f"ResNet{depth}"})
    for depth in (50, 101, 152, 200, 288, 600):
        table[f"nf_seresnet{depth}"] = (_NF_RESNET, {"variant": f"ResNet{depth}", "use_se": True})
    for k in range(9):
        table[f"nf_regnet_b{k}"] = (_NF_REGNET, {"variant": f"B{k}"})
    for depth in (50, 101, 152, 200):
        table[f"bn_resnet{depth}"] = (_BN_RESNET, {"variant": f"ResNet{depth}"})
    return table


_MODELS = _build_table()

# ResNet-style models have no per-variant resolution or dropout in the official code; they use
# the standard 224 px ImageNet recipe (official `experiment.py` base config).
_RESNET_INFO = {"train_imsize": 224, "test_imsize": 224, "drop_rate": 0.0, "randaugment_magnitude": None}


def list_models() -> list[str]:
    """Every name `create` accepts, in a stable order."""
    return list(_MODELS)


def _lookup(name: str) -> tuple[_Family, dict[str, Any]]:
    if name not in _MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(_MODELS)}.")
    return _MODELS[name]


def create(name: str, num_classes: int, **kwargs: Any) -> hk.Module:
    """Builds model `name` (call inside `hk.transform_with_state`).

    `kwargs` are the family's constructor knobs (e.g. NFNet's `drop_rate`, `width`, `depths`,
    `widths`, `group_size`, `stem_channels`, `stochdepth_rate`); the variant is fixed by the name.
    The module is called as `model(x, is_training, return_features=False)`.
    """
    family, fixed = _lookup(name)
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"{name!r} fixes {clash} already; pick another model name instead of passing them.")
    return family.module(num_classes=num_classes, **fixed, **kwargs)


def variant_info(name: str) -> dict[str, Any]:
    """Recipe facts for `name`: `train_imsize`, `test_imsize`, `drop_rate`, `randaugment_magnitude`
    (None where RandAugment is not used), plus `stochdepth_rate` for NFNets (the experiment's
    0.25, paper App. A.1; the class default is 0.1) — paper Table 1, official `base.py:nfnet_params`."""
    family, fixed = _lookup(name)
    if family not in (_NFNET, _NF_REGNET):
        return dict(_RESNET_INFO)
    spec = family.variants[fixed["variant"]]
    info = {
        "train_imsize": spec.train_imsize,
        "test_imsize": spec.test_imsize,
        "drop_rate": spec.drop_rate,
        "randaugment_magnitude": None,
    }
    if family is _NFNET:
        info.update(randaugment_magnitude=spec.randaugment_magnitude, stochdepth_rate=0.25)
    return info


def _depths(family: _Family, fixed: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    if kwargs.get("depths") is not None:
        return tuple(kwargs["depths"])
    return tuple(family.variants[fixed["variant"]].depths)


def stage_regexes(name: str, **kwargs: Any) -> dict[str, str]:
    """label (`stem`, `stage_1`…`stage_4`, `head`) → regex over parameter paths
    (`f"{module}/{leaf}"`, e.g. `NFNet/~/nf_block_3/conv1b/gain`), for per-stage telemetry.

    Every parameter of the model matches exactly one regex (use `re.match` or `re.search`; they
    are anchored). Pass the same `depths` you passed to `create` for custom depths.
    """
    family, fixed = _lookup(name)
    scope = kwargs.get("name", family.scope)
    regexes = {"stem": rf"^{scope}/~/{family.stem}/"}
    index = 0
    for stage, depth in enumerate(_depths(family, fixed, kwargs), start=1):
        names = [family.block if i == 0 else f"{family.block}_{i}" for i in range(index, index + depth)]
        regexes[f"stage_{stage}"] = rf"^{scope}/~/(?:{'|'.join(names)})/"
        index += depth
    regexes["head"] = rf"^{scope}/~/{family.head}/"
    return regexes


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or `jax.ShapeDtypeStruct`s)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(params)))


def make_forward(name: str, num_classes: int = 1000, kwargs: Mapping[str, Any] | None = None
                 ) -> hk.TransformedWithState:
    """The classifier as the runner, the evaluation and analysis tools see it:
    `forward.apply(params, state, rng, images, is_training=...) -> (logits, state)`.

    The one place where a model name and its kwargs (`config.model`) become a Haiku transform, so
    that training and evaluation build exactly the same parameter tree. Raises ValueError (listing
    the valid names) for an unknown `name` at once, rather than at the first trace.
    """
    _lookup(name)
    kwargs = dict(kwargs or {})

    def forward(images: jax.Array, is_training: bool) -> jax.Array:
        return create(name, num_classes, **kwargs)(images, is_training=is_training)

    return hk.transform_with_state(forward)


def abstract_init(forward: hk.TransformedWithState, image_size: int) -> tuple[Any, Any]:
    """(params, state) of `forward.init` as `jax.ShapeDtypeStruct` trees, nothing computed: for
    checking loaded weights against the model before anything is initialised."""
    return jax.eval_shape(lambda: forward.init(
        jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)), is_training=True))


def macs_and_params(name: str, imsize: int, **kwargs: Any) -> tuple[int, int]:
    """(MACs for one `imsize`² image, parameter count) from one abstract trace; nothing runs.

    `num_classes` defaults to 1000. The model is initialised in training mode (a BN-ResNet's
    moving averages only exist after a training call).
    """
    num_classes = kwargs.pop("num_classes", 1000)

    def zeros_instead_of_initialisers(x: jax.Array, is_training: bool) -> jax.Array:
        # Shapes are all the count needs; tracing each parameter's random initialiser was about
        # half of the trace's time (initialisers hold no convolutions or matmuls: MACs unchanged).
        with hk.custom_creator(lambda next_creator, shape, dtype, init, context:
                               next_creator(shape, dtype, jnp.zeros)):
            return create(name, num_classes, **kwargs)(x, is_training)

    model = hk.transform_with_state(zeros_instead_of_initialisers)
    macs, (params, _) = flops.traced_counts(lambda rng, x: model.init(rng, x, True), imsize)
    return macs, count_params(params)


def count_macs(name: str, imsize: int, **kwargs: Any) -> int:
    """Multiply-accumulates of convs and linears for one `imsize`² image (the paper's Table 3
    "#FLOPs" at the test resolution; see `flops`). `num_classes` defaults to 1000."""
    return macs_and_params(name, imsize, **kwargs)[0]
