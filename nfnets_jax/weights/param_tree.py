"""Haiku parameter trees as flat '/'-joined names, and a by-name comparison with a model's tree.

Haiku params are `{module path: {leaf: array}}` and module paths themselves contain '/' (e.g.
`NFNet/~/nf_block_3/conv1b`), so a flat key `module/leaf` is split on its LAST '/'. Haiku returns
modules sorted lexicographically (`nf_block_10` before `nf_block_2`; docs/official_code_notes.md), so
trees are always matched by name, never by position.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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


def differences(found: Mapping[str, Any], expected: Mapping[str, Any], *, found_as: str = "loaded",
                compare_dtypes: bool = False) -> list[str]:
    """Every name missing from `found`, not in `expected`, or of another shape (and, with
    `compare_dtypes`, dtype), one line each: the one comparison of stored arrays with a model's.

    Both are flat `{name: array-like}` maps (only `.shape`, and `.dtype` when compared, are read);
    `found_as` names the stored side in the lines ("loaded", "checkpoint").
    """
    lines = [f"missing:     {key} {_shape(expected[key])}" for key in sorted(expected.keys() - found.keys())]
    lines += [f"unexpected:  {key} {_shape(found[key])}" for key in sorted(found.keys() - expected.keys())]
    for key in sorted(found.keys() & expected.keys()):
        have, want = found[key], expected[key]
        if _shape(have) != _shape(want):
            lines.append(f"wrong shape: {key} {found_as} {_shape(have)}, model expects {_shape(want)}")
        elif compare_dtypes and np.dtype(have.dtype) != np.dtype(want.dtype):
            lines.append(f"wrong dtype: {key} {found_as} {np.dtype(have.dtype)}, model expects "
                         f"{np.dtype(want.dtype)}")
    return lines


def check_params_match(loaded: ParamTree, expected: ParamTree) -> None:
    """Raises `ParamsMismatchError` listing every missing, unexpected and wrong-shaped param.

    `expected` is the model's tree; its leaves may be arrays or `jax.ShapeDtypeStruct`s (e.g. from
    `jax.eval_shape` of the transformed init), only `.shape` is read. Dtypes are not compared: a
    float32 checkpoint legitimately feeds a model initialised in bfloat16.
    """
    have, want = flatten_params(loaded), flatten_params(expected)
    lines = differences(have, want)
    if lines:
        count = lambda kind: sum(line.startswith(kind) for line in lines)
        raise ParamsMismatchError(
            f"loaded parameters do not match the model ({count('missing')} missing, {count('unexpected')}"
            f" unexpected, {count('wrong shape')} wrong-shaped; the model has {len(want)} params in"
            f" {len(expected)} modules, the file {len(have)} in {len(loaded)}). Check that the"
            " model name and num_classes match the weights:\n" + "\n".join("  " + line for line in lines)
        )


def check_numbers(params: ParamTree, source: str) -> None:
    """Raises ValueError naming the first parameter of `params` (loaded from `source`) that is not
    an array of numbers (strings, bytes, objects, dates, booleans) or holds NaN or inf.

    Weights are checked when they are loaded, so that a bad file is refused in one line naming
    it, not found at the first step as a "non-finite loss" that points at the learning rate.
    """
    for key, value in flatten_params(params).items():
        array = np.asarray(value)
        floating = array.dtype.kind == "f" or (array.dtype.kind == "V" and _is_ml_float(array.dtype))
        if not (floating or array.dtype.kind in "iuc"):
            raise ValueError(f"{source}: parameter {key} holds {array.dtype} values, not numbers; it is "
                             "not a weight file this model can use.")
        if floating and not np.all(np.isfinite(array.astype(np.float32))):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array.astype(np.float32))))
            raise ValueError(f"{source}: parameter {key} holds {bad} NaN or infinite value(s); these "
                             "weights cannot be trained or evaluated. Use an intact copy of the file.")


def _is_ml_float(dtype: np.dtype) -> bool:
    import ml_dtypes  # pylint: disable=import-outside-toplevel

    try:
        return bool(ml_dtypes.finfo(dtype))
    except (TypeError, ValueError):
        return False


def _split(tree: ParamTree, patterns: Sequence[str]) -> tuple[Params, Params]:
    """(kept, excluded): leaves whose `module/leaf` path matches any pattern are excluded."""
    compiled = [re.compile(p) for p in patterns]
    kept: Params = {}
    excluded: Params = {}
    for module, leaves in tree.items():
        for leaf, value in leaves.items():
            target = excluded if any(c.search(f"{module}/{leaf}") for c in compiled) else kept
            target.setdefault(module, {})[leaf] = value
    return kept, excluded


def check_pretrained_fits(loaded: ParamTree, expected: ParamTree, *, exclude: Sequence[str] = ()) -> None:
    """Raises `ParamsMismatchError` unless `loaded` fits `expected` outside `exclude` (regexes
    over `module/leaf`, e.g. the classifier that fine-tuning replaces; paper §6.2, App. A.5).

    `expected` may be abstract (`jax.eval_shape` of the model's init), so that wrong weights are
    refused when the experiment is built, before any parameter is initialised.
    """
    check_params_match(_split(loaded, exclude)[0], _split(expected, exclude)[0])


def merge_pretrained(loaded: ParamTree, fresh: ParamTree, *, exclude: Sequence[str] = ()) -> Params:
    """Fresh params for paths matching `exclude` (the new head), loaded params for the rest, in
    the fresh params' dtypes.

    Raises `ParamsMismatchError` listing every missing, unexpected or wrong-shaped parameter among
    those that are loaded, before any training starts.
    """
    check_pretrained_fits(loaded, fresh, exclude=exclude)
    loaded_kept, _ = _split(loaded, exclude)
    _, fresh_excluded = _split(fresh, exclude)
    merged: Params = {}
    for module, leaves in fresh.items():
        for leaf, value in leaves.items():
            source = fresh_excluded if leaf in fresh_excluded.get(module, {}) else loaded_kept
            merged.setdefault(module, {})[leaf] = np.asarray(source[module][leaf], dtype=value.dtype)
    return merged
