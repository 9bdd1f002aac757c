"""Haiku parameter trees as flat '/'-joined names, and a by-name comparison with a model's tree.

Haiku params are `{module path: {leaf: array}}` and module paths themselves contain '/' (e.g.
`NFNet/~/nf_block_3/conv1b`), so a flat key `module/leaf` is split on its LAST '/'. Haiku returns
modules sorted lexicographically (`nf_block_10` before `nf_block_2`; docs/official_code_notes.md), so
trees are always matched by name, never by position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ParamTree = Mapping[str, Mapping[str, Any]]  # Leaves: arrays, jax arrays or ShapeDtypeStructs.
Params = dict[str, dict[str, np.ndarray]]  # Haiku's params layout, as loaded from a file.


class ParamsMismatchError(ValueError):
    """Loaded parameters differ from the model's by name or shape (every difference is listed)."""


def join_key(module: str, leaf: str) -> str:
    """`module/leaf`, refusing leaf names that would make the split ambiguous."""
    if "/" in leaf or not leaf:
        raise ValueError(f"leaf name {leaf!r} of module {module!r} must be non-empty without '/'")
    if not module:
        raise ValueError(f"module path of leaf {leaf!r} must be non-empty")
    return f"{module}/{leaf}"


def split_key(key: str) -> tuple[str, str]:
    """Inverse of `join_key`: splits `NFNet/~/linear/w` into (`NFNet/~/linear`, `w`)."""
    module, sep, leaf = key.rpartition("/")
    if not sep or not module or not leaf:
        raise ValueError(f"parameter key {key!r} is not of the form 'module/leaf'")
    return module, leaf


def flatten_params(params: ParamTree) -> dict[str, Any]:
    """`{module: {leaf: x}}` -> `{'module/leaf': x}`, in the tree's own order."""
    return {
        join_key(module, leaf): value for module, leaves in params.items() for leaf, value in leaves.items()
    }


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`{'module/leaf': x}` -> `{module: {leaf: x}}` (Haiku's params layout)."""
    params: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        module, leaf = split_key(key)
        params.setdefault(module, {})[leaf] = value
    return params


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def check_params_match(loaded: ParamTree, expected: ParamTree) -> None:
    """Raises `ParamsMismatchError` listing every missing, unexpected and wrong-shaped param.

    `expected` is the model's tree; its leaves may be arrays or `jax.ShapeDtypeStruct`s (e.g. from
    `jax.eval_shape` of the transformed init), only `.shape` is read. Dtypes are not compared: a
    float32 checkpoint legitimately feeds a model initialised in bfloat16.
    """
    have = {key: _shape(value) for key, value in flatten_params(loaded).items()}
    want = {key: _shape(value) for key, value in flatten_params(expected).items()}
    missing = [f"  missing:     {key} {want[key]}" for key in sorted(want.keys() - have.keys())]
    unexpected = [f"  unexpected:  {key} {have[key]}" for key in sorted(have.keys() - want.keys())]
    wrong = [
        f"  wrong shape: {key} loaded {have[key]}, model expects {want[key]}"
        for key in sorted(want.keys() & have.keys())
        if have[key] != want[key]
    ]
    if missing or unexpected or wrong:
        raise ParamsMismatchError(
            f"loaded parameters do not match the model ({len(missing)} missing, {len(unexpected)}"
            f" unexpected, {len(wrong)} wrong-shaped; the model has {len(want)} params in"
            f" {len(expected)} modules, the file {len(have)} in {len(loaded)}). Check that the"
            " model name and num_classes match the weights:\n" + "\n".join(missing + unexpected + wrong)
        )
