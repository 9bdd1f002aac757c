"""timm's `dm_nfnet_f0` … `dm_nfnet_f6` state dicts converted to our Haiku NFNet parameters.

timm publishes DeepMind's NFNet-F0…F6 weights, converted to PyTorch, as `.safetensors` files
(`timm/dm_nfnet_f0.dm_in1k` … on the Hugging Face hub). This module maps such a state dict onto
the tree of our `NFNet` (which is DeepMind's), by an explicit name table, not by position or by
guessing from names:

| timm module (block `stages.S.B`)    | ours (`NFNet/~/…`, block `nf_block_I`) | leaves                     |
|-------------------------------------|----------------------------------------|----------------------------|
| `stem.conv1` … `stem.conv4`         | `stem_conv0` … `stem_conv3`            | conv                       |
| `stages.S.B.conv1`                  | `nf_block_I/~/conv0`                   | conv                       |
| `stages.S.B.conv2` / `conv2b`       | `nf_block_I/~/conv1` / `conv1b`        | conv                       |
| `stages.S.B.conv3`                  | `nf_block_I/~/conv2`                   | conv                       |
| `stages.S.B.downsample.conv`        | `nf_block_I/~/conv_shortcut`           | conv                       |
| `stages.S.B.attn_last.fc1` / `fc2`  | `…/squeeze_excite/~/linear` / `linear_1` | 1×1 conv → linear        |
| `stages.S.B.skipinit_gain`          | `nf_block_I/skip_gain`                 | scalar                     |
| `final_conv`                        | `final_conv`                           | conv                       |
| `head.fc`                           | `linear`                               | linear                     |

with I = (blocks of the stages before S) + B. Leaves: a conv's `weight` (O, I/groups, kh, kw)
becomes `w` (kh, kw, I/groups, O); its `gain` (O, 1, 1, 1) becomes `gain` (O,); `bias` stays.
A linear's `weight` (out, in) becomes `w` (in, out), `bias` becomes `b`; the squeeze-excite's
1×1 convs (out, in, 1, 1) become linears the same way.

The converted model computes DeepMind's function, not timm's: timm's port differs in two places
(exact-erf GELU instead of the tanh form; weight standardisation with (var + 1e-5) inside the
square root instead of a 1e-4 floor on fan_in·var). See docs/weights.md for the measured effect.
Only the NFNet-F family is supported: timm's NF-ResNets and NF-RegNets are different networks
from DeepMind's (padding, shortcut, activation-gain placement, widths; docs/weights.md).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.weights.param_tree import Params, ParamsMismatchError, ParamTree, flatten_params, unflatten_params
from nfnets_jax.weights.released import detect_nfnet_variant
from nfnets_jax.weights.safetensors_format import read_safetensors

# timm's model names whose weights this module converts -> our registry name.
TIMM_NFNET_MODELS: Mapping[str, str] = {f"dm_nfnet_f{k}": f"nfnet_f{k}" for k in range(7)}

_SCOPE = "NFNet/~/"
_BASE_DEPTHS = (1, 2, 6, 3)  # F_k has (k + 1) times these blocks per stage.
_FIRST_STAGE_WIDTH_TO_SUFFIX = {256: "", 384: "plus"}
TIMM_STD_CONV_EPS = 1e-5  # timm's NfCfg.std_conv_eps, which its dm_nfnet_f* configs keep.
_OUR_STD_FLOOR = 1e-4  # layers.WSConv2D's eps: a floor on fan_in·var.


class TimmWeightsError(ParamsMismatchError):
    """A timm state dict does not fit the NFNet it is converted to; every problem is listed."""


class _LayoutError(ValueError):
    """One tensor is not laid out as its kind of layer stores it in timm (message: what is expected)."""


def _conv_kernel(x: np.ndarray) -> np.ndarray:
    if x.ndim != 4:
        raise _LayoutError("a conv weight (out, in/groups, kh, kw)")
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # OIHW -> HWIO


def _conv_gain(x: np.ndarray) -> np.ndarray:
    if x.ndim != 4 or x.shape[1:] != (1, 1, 1):
        raise _LayoutError("a ScaledStdConv2d gain (out, 1, 1, 1)")
    return x.reshape(x.shape[0])


def _vector(x: np.ndarray) -> np.ndarray:
    if x.ndim != 1:
        raise _LayoutError("a bias (out,)")
    return x


def _linear_weight(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise _LayoutError("a Linear weight (out, in)")
    return np.ascontiguousarray(x.T)


def _pointwise_conv_as_linear(x: np.ndarray) -> np.ndarray:
    if x.ndim != 4 or x.shape[2:] != (1, 1):
        raise _LayoutError("a 1x1 conv weight (out, in, 1, 1)")
    return np.ascontiguousarray(x[:, :, 0, 0].T)


def _scalar(x: np.ndarray) -> np.ndarray:
    if x.ndim != 0:
        raise _LayoutError("a scalar ()")
    return x


Converter = Callable[[np.ndarray], np.ndarray]
# Per kind of layer: (timm leaf, our leaf, layout conversion).
_LEAVES: Mapping[str, tuple[tuple[str, str, Converter], ...]] = {
    "conv": (("weight", "w", _conv_kernel), ("gain", "gain", _conv_gain), ("bias", "bias", _vector)),
    "linear": (("weight", "w", _linear_weight), ("bias", "b", _vector)),
    "pointwise_linear": (("weight", "w", _pointwise_conv_as_linear), ("bias", "b", _vector)),
}
# Layers outside the blocks: (timm module, our module, kind).
_STEM_AND_HEAD = (
    ("stem.conv1", "stem_conv0", "conv"),
    ("stem.conv2", "stem_conv1", "conv"),
    ("stem.conv3", "stem_conv2", "conv"),
    ("stem.conv4", "stem_conv3", "conv"),
    ("final_conv", "final_conv", "conv"),
    ("head.fc", "linear", "linear"),
)
# Layers of one block: (timm module under `stages.S.B.`, our module under `nf_block_I/~/`, kind).
_BLOCK_LAYERS = (
    ("conv1", "conv0", "conv"),
    ("conv2", "conv1", "conv"),
    ("conv2b", "conv1b", "conv"),
    ("conv3", "conv2", "conv"),
    ("downsample.conv", "conv_shortcut", "conv"),
    ("attn_last.fc1", "squeeze_excite/~/linear", "pointwise_linear"),
    ("attn_last.fc2", "squeeze_excite/~/linear_1", "pointwise_linear"),
)
_BLOCK_SCALARS = (("skipinit_gain", "skip_gain", _scalar),)
_STAGE_KEY = re.compile(r"stages\.(\d+)\.(\d+)\.")


def _block_module(index: int) -> str:
    return f"{_SCOPE}nf_block" + (f"_{index}" if index else "")


def timm_key_table(depths: tuple[int, ...]) -> dict[str, tuple[str, Converter]]:
    """timm state-dict key -> (our '/'-joined param key, layout conversion), for blocks per stage
    `depths`. A `downsample` entry exists for every block; the model decides which ones it has."""
    table: dict[str, tuple[str, Converter]] = {}

    def add_layer(timm_module: str, our_module: str, kind: str) -> None:
        for timm_leaf, our_leaf, convert in _LEAVES[kind]:
            table[f"{timm_module}.{timm_leaf}"] = (f"{our_module}/{our_leaf}", convert)

    for timm_module, our_module, kind in _STEM_AND_HEAD:
        add_layer(timm_module, _SCOPE + our_module, kind)
    index = 0
    for stage, depth in enumerate(depths):
        for block in range(depth):
            prefix, ours = f"stages.{stage}.{block}", _block_module(index)
            for timm_module, our_module, kind in _BLOCK_LAYERS:
                add_layer(f"{prefix}.{timm_module}", f"{ours}/~/{our_module}", kind)
            for timm_leaf, our_leaf, convert in _BLOCK_SCALARS:
                table[f"{prefix}.{timm_leaf}"] = (f"{ours}/{our_leaf}", convert)
            index += 1
    return table


# The inverse of each layout conversion above: our layout back to timm's.
_TO_TIMM_LAYOUT: Mapping[Converter, Converter] = {
    _conv_kernel: lambda x: np.ascontiguousarray(x.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
    _conv_gain: lambda x: x.reshape(x.shape[0], 1, 1, 1),
    _vector: lambda x: x,
    _linear_weight: lambda x: np.ascontiguousarray(x.T),
    _pointwise_conv_as_linear: lambda x: np.ascontiguousarray(x.T[:, :, None, None]),
    _scalar: lambda x: x,
}


def to_timm_state_dict(params: ParamTree, depths: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Our NFNet params under timm's `dm_nfnet_f*` names and layouts: the inverse of
    `convert_timm_nfnet`, by the same name table.

    `depths` are the blocks per stage (our tree numbers its blocks without saying where a stage
    begins): `(k + 1) * (1, 2, 6, 3)` for F_k, `config.model.kwargs.depths` for a small NFNet.
    Written with `safetensors_format.write_safetensors`, the result is a file that timm's
    `dm_nfnet_f*` (same depths and widths) loads, and that `load_timm_nfnet` reads back exactly.

    Raises:
      ValueError: a param of `params` that the table for `depths` does not name (wrong depths, or
        not an NFNet), listing them all. (The table names every block's optional shortcut conv, so
        a name without a param is not an error here; timm's loader reports a missing tensor.)
    """
    flat = {key: np.asarray(value) for key, value in flatten_params(params).items()}
    table = timm_key_table(tuple(depths))
    unnamed = sorted(set(flat) - {ours for ours, _ in table.values()})
    if unnamed:
        raise ValueError(f"{len(unnamed)} params have no timm name for an NFNet with {tuple(depths)} "
                         f"blocks per stage (wrong depths?): {', '.join(unnamed[:5])}"
                         + (" ..." if len(unnamed) > 5 else ""))
    return {timm_key: _TO_TIMM_LAYOUT[convert](flat[ours])
            for timm_key, (ours, convert) in table.items() if ours in flat}


def stage_depths(state: Mapping[str, Any]) -> tuple[int, ...]:
    """Blocks per stage, from the `stages.S.B.` indices of the keys (4 stages for NFNets)."""
    depths = [0, 0, 0, 0]
    for key in state:
        match = _STAGE_KEY.match(key)
        if match and int(match.group(1)) < len(depths):
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths[stage], block + 1)
    return tuple(depths)


def infer_model_name(state: Mapping[str, Any]) -> str:
    """Our registry name (`nfnet_f0` …) for a timm `dm_nfnet_f*` state dict, from its layout:
    F_k has (k + 1)·(1, 2, 6, 3) blocks per stage and a first stage 256 wide (384 for F_k+)."""
    depths = stage_depths(state)
    ks = [k for k in range(8) if depths == tuple((k + 1) * d for d in _BASE_DEPTHS)]
    if not ks:
        raise TimmWeightsError(
            f"a state dict with {depths} blocks per stage is not one of timm's dm_nfnet_f0…f6"
            f" (F_k has (k+1)·{_BASE_DEPTHS}); pass the model's parameter tree as `expected` to"
            " convert another NFNet layout"
        )
    width_key = "stages.0.0.conv3.weight"
    width = int(np.shape(state[width_key])[0]) if width_key in state else 256
    if width not in _FIRST_STAGE_WIDTH_TO_SUFFIX:
        raise TimmWeightsError(
            f"{width_key} has {width} output channels; F{ks[0]} has 256 (384 for F{ks[0]}+)"
        )
    return f"nfnet_f{ks[0]}{_FIRST_STAGE_WIDTH_TO_SUFFIX[width]}"


def abstract_nfnet_params(model_name: str, num_classes: int) -> ParamTree:
    """Our model's parameter shapes (`jax.ShapeDtypeStruct`s), traced without computing anything."""
    from nfnets_jax.models import registry  # pylint: disable=import-outside-toplevel

    model = registry.make_forward(model_name, num_classes)
    params, _ = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False)
    )
    return hk.data_structures.to_mutable_dict(params)


def convert_timm_nfnet(state_dict: Mapping[str, Any], expected: ParamTree | None = None) -> Params:
    """Converts a timm NFNet state dict (`name -> array`) to our Haiku params, checking everything.

    `expected` is the target model's tree (arrays or `jax.ShapeDtypeStruct`s, e.g. from
    `jax.eval_shape` of its init); by default it is the `nfnet_f*` that `infer_model_name` finds,
    with as many classes as `head.fc.weight` has rows. Raises `TimmWeightsError` listing, by timm
    name, every tensor that maps to nothing in the model, every model parameter the state dict
    lacks, and every tensor whose converted shape differs from the model's; nothing is returned
    half-converted. Dtypes are kept (float32, float16 or bfloat16).
    """
    state = {str(key): np.asarray(value) for key, value in state_dict.items()}
    inferred = None
    if expected is None:
        inferred = infer_model_name(state)
        head = state.get("head.fc.weight")
        num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
        expected = abstract_nfnet_params(inferred, num_classes)
    want = {key: tuple(int(d) for d in leaf.shape) for key, leaf in flatten_params(expected).items()}
    table = timm_key_table(stage_depths(state))
    timm_name = {ours: timm for timm, (ours, _) in table.items()}

    converted: dict[str, np.ndarray] = {}
    unexpected, wrong = [], []
    for key, value in state.items():
        if key not in table:
            unexpected.append(f"  unexpected:  {key} {value.shape} (no NFNet parameter has this name)")
            continue
        ours, convert = table[key]
        if value.dtype.kind not in "fV":  # floats; bfloat16 is an ml_dtypes void-kind type
            wrong.append(f"  wrong dtype: {key} is {value.dtype}, not a floating-point array (-> {ours})")
            continue
        if ours not in want:
            unexpected.append(f"  unexpected:  {key} {value.shape} (would be {ours}, which the model does not have)")
            continue
        try:
            array = convert(value)
        except _LayoutError as error:
            wrong.append(f"  wrong shape: {key} {value.shape} is not {error} (-> {ours}, model expects {want[ours]})")
            continue
        if array.shape != want[ours]:
            wrong.append(
                f"  wrong shape: {key} {value.shape} -> {ours} {array.shape}, model expects {want[ours]}"
            )
            continue
        converted[ours] = array
    missing = [
        f"  missing:     {timm_name.get(ours, '(no timm name)')} -> {ours} {shape}"
        for ours, shape in want.items()
        if ours not in converted and timm_name.get(ours) not in state
    ]
    if unexpected or missing or wrong:
        target = inferred or "the given model"
        raise TimmWeightsError(
            f"the timm state dict does not fit {target} ({len(missing)} missing, {len(unexpected)}"
            f" unexpected, {len(wrong)} wrong-shaped or -typed of {len(state)} tensors; the model has"
            f" {len(want)} params). Check that it is a dm_nfnet_f* state dict of the same variant"
            " and number of classes:\n" + "\n".join(sorted(missing) + sorted(unexpected) + sorted(wrong))
        )
    params = unflatten_params({key: converted[key] for key in want})
    if inferred is not None and detect_nfnet_variant(params) != inferred:
        raise AssertionError(f"converted tree detected as {detect_nfnet_variant(params)}, built as {inferred}")
    return params


def match_timm_standardization(params: ParamTree, eps: float = TIMM_STD_CONV_EPS) -> Params:
    """Rescales every conv gain so that our weight standardisation yields timm's kernels.

    timm standardises with (w - mean) / sqrt(var + eps) · gain / sqrt(fan_in); we (as DeepMind)
    use (w - mean) · gain · rsqrt(max(fan_in · var, 1e-4)). Both depend only on the weights, so
    multiplying each gain by sqrt(max(fan_in · var, 1e-4) / (fan_in · (var + eps))) makes the two
    standardised kernels equal. Use it to reproduce timm's outputs (docs/weights.md); by default
    the converted weights compute DeepMind's function, which is what they were trained with.
    timm's exact-erf GELU (ours is DeepMind's tanh form) remains the only difference.
    """
    matched: Params = {}
    for module, leaves in params.items():
        matched[module] = dict(leaves)
        if "w" in leaves and "gain" in leaves and np.ndim(leaves["w"]) == 4:
            kernel = np.asarray(leaves["w"], np.float64)  # HWIO
            fan_in = int(np.prod(kernel.shape[:3]))
            var = np.var(kernel, axis=(0, 1, 2))
            scale = np.sqrt(np.maximum(fan_in * var, _OUR_STD_FLOOR) / (fan_in * (var + eps)))
            gain = np.asarray(leaves["gain"])
            matched[module]["gain"] = (gain.astype(np.float64) * scale).astype(gain.dtype)
    return matched


def looks_like_pytorch_checkpoint(path: str | os.PathLike) -> bool:
    """True for a `torch.save` zip archive (`pytorch_model.bin`, `*.pth`): its `data.pkl` is a pickle."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())


def load_timm_nfnet(source: str | os.PathLike | Mapping[str, Any], expected: ParamTree | None = None) -> Params:
    """Our NFNet params from a timm `.safetensors` file (read without torch) or a state dict.

    See `convert_timm_nfnet` for `expected` and the checks. The variant is recognised from the
    layout (`infer_model_name`, then `detect_nfnet_variant` on the result, as for DeepMind's files).
    PyTorch's own checkpoints (`torch.save` pickles) are refused: unpickling them can run code.
    """
    if isinstance(source, Mapping):
        return convert_timm_nfnet(source, expected)
    if looks_like_pytorch_checkpoint(source):
        raise ValueError(
            f"{os.fspath(source)} is a PyTorch pickle checkpoint (torch.save), which can run code when"
            " loaded; use the same weights as .safetensors (timm publishes dm_nfnet_f* as model.safetensors)"
        )
    return convert_timm_nfnet(read_safetensors(source), expected)
