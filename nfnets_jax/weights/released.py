"""DeepMind's released NFNet weights: where they are, how to recognise them, how to fetch them.

DeepMind published NFNet-F0 … F5 (trained without SAM) and F6 (trained with SAM) as
`https://storage.googleapis.com/dm-nfnets/{F0..F6}_haiku.npz` (official `nfnet_demo_colab.ipynb`). No
checksum was published and none is known to us, so every `sha256` below is None: after a download
you trust, pin the digest that `download` returns (pass it as `sha256=`), and later fetches are
verified against it.

The variant of a file is recognised from its number of Haiku modules. Each NF block has 7 modules
(the block itself for `skip_gain`, conv0, conv1, conv1b, conv2 and the two SE linears), each stage's
first block adds `conv_shortcut`, and the stem (4 convs) and head (final_conv, linear) add 6; F_k
has 12·(k+1) blocks, so 84·(k+1) + 10 modules. F_k+ has the same count but wider stages (its first
block outputs 384 channels instead of 256), which tells the two apart.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from types import MappingProxyType

from nfnets_jax.weights.deepmind_pickle import load_deepmind_params
from nfnets_jax.weights.download import download, normalize_sha256, sha256_of_file
from nfnets_jax.weights.param_tree import Params, ParamTree

RELEASED_BASE_URL = "https://storage.googleapis.com/dm-nfnets"


@dataclasses.dataclass(frozen=True)
class ReleasedWeights:
    """One released weight file. `sha256` is None: DeepMind published no digest."""

    model_name: str
    file_name: str
    trained_with_sam: bool
    sha256: str | None = None

    def url(self, base_url: str = RELEASED_BASE_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.file_name}"


RELEASED_WEIGHTS: Mapping[str, ReleasedWeights] = MappingProxyType(
    {
        f"nfnet_f{k}": ReleasedWeights(f"nfnet_f{k}", f"F{k}_haiku.npz", trained_with_sam=(k == 6))
        for k in range(7)
    }
)

# Module count -> depth index k of F_k (docs/official_code_notes.md; F7 was never released).
MODULE_COUNT_TO_DEPTH_INDEX: Mapping[int, int] = MappingProxyType(
    {94: 0, 178: 1, 262: 2, 346: 3, 430: 4, 514: 5, 598: 6, 682: 7}
)
_FIRST_BLOCK_CONV2 = "NFNet/~/nf_block/~/conv2"
_FIRST_STAGE_WIDTH_TO_SUFFIX: Mapping[int, str] = MappingProxyType({256: "", 384: "plus"})


def detect_nfnet_variant(params: ParamTree) -> str:
    """Registry name (`nfnet_f0` … `nfnet_f7`, `…plus`) of an NFNet param tree, from its layout."""
    count = len(params)
    if count not in MODULE_COUNT_TO_DEPTH_INDEX:
        raise ValueError(
            f"a tree of {count} modules is not an NFNet-F checkpoint; F0…F7 have"
            f" {sorted(MODULE_COUNT_TO_DEPTH_INDEX)} modules"
        )
    depth_index = MODULE_COUNT_TO_DEPTH_INDEX[count]
    try:
        width = int(params[_FIRST_BLOCK_CONV2]["w"].shape[-1])
    except KeyError:
        raise ValueError(
            f"an NFNet tree needs {_FIRST_BLOCK_CONV2}/w; this tree of {count} modules has none"
        ) from None
    if width not in _FIRST_STAGE_WIDTH_TO_SUFFIX:
        raise ValueError(
            f"{_FIRST_BLOCK_CONV2}/w has {width} output channels; F{depth_index} has 256 and"
            f" F{depth_index}+ 384 (a width multiplier other than 1 is not a released layout)"
        )
    return f"nfnet_f{depth_index}{_FIRST_STAGE_WIDTH_TO_SUFFIX[width]}"


def fetch_released_params(
    model_name: str,
    cache_dir: str | os.PathLike,
    sha256: str | None = None,
    *,
    base_url: str = RELEASED_BASE_URL,
) -> Params:
    """Downloads (once) and safely loads DeepMind's weights for `model_name`, e.g. `nfnet_f0`.

    The file is cached as `cache_dir/F0_haiku.npz`. With a digest pinned (here or in
    `RELEASED_WEIGHTS`) a cached file is re-verified and replaced if it differs. `base_url` points
    at a mirror (any `https://`, `http://` or `file://` folder holding the same file names).
    The loaded tree's layout is checked to be `model_name`'s.
    """
    if model_name not in RELEASED_WEIGHTS:
        raise ValueError(
            f"DeepMind released no weights for {model_name!r}; released: {sorted(RELEASED_WEIGHTS)}"
        )
    release = RELEASED_WEIGHTS[model_name]
    pinned = normalize_sha256(sha256) or release.sha256
    path = pathlib.Path(cache_dir) / release.file_name
    if not path.exists() or (pinned is not None and sha256_of_file(path) != pinned):
        download(release.url(base_url), path, pinned)
    params = load_deepmind_params(path)
    found = detect_nfnet_variant(params)
    if found != model_name:
        raise ValueError(f"{path} holds {found} weights, not {model_name}; delete it and fetch again")
    return params

