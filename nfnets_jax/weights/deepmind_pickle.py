"""Loads DeepMind's released NFNet weights without running any code from the file.

The released `F0_haiku.npz` … `F6_haiku.npz` are not NumPy archives but dill pickles of the Haiku
parameter tree `{module path: {leaf name: array}}` (`utils.py:load_haiku_file`). Ordinary unpickling
imports and calls whatever the file names, so a tampered file could run any command. Here:

- every global the file names is resolved through `allowlist.resolve` (safe stand-ins for numpy
  array reconstruction, dill's indirections, Haiku's mapping classes, jax's DeviceArray); nothing
  is imported, and anything else raises `UnsafeCheckpointError` naming the refused global;
- BUILD (which sets an object's state, and on an arbitrary object could overwrite attributes such
  as a function's `__defaults__`) is allowed only on numpy arrays and dtypes, which is all a weight
  file uses it for; on a dtype only to restate its own layout (`allowlist.set_dtype_state`:
  numpy's `dtype.__setstate__` would otherwise let a file resize a dtype an array already uses,
  exposing process memory); copyreg extension codes (which bypass name lookup) are refused.

The pure-Python unpickler is used because its opcode table can be narrowed; a weight file has a
few thousand opcodes around large byte strings, so this costs little.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from nfnets_jax.weights.allowlist import Refusal, resolve, set_array_state, set_dtype_state
from nfnets_jax.weights.param_tree import Params

_EXPLANATION = (
    "DeepMind weight files contain only numpy arrays in nested dicts (and old Haiku mapping "
    "classes), so this file is not a genuine weight file, or it is in a format this loader does "
    "not know. Nothing from it was run. Re-download it from RELEASED_WEIGHTS and check its sha256."
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A weight file asked for a global or an operation outside the array/container allowlist."""


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
    """pickle's Python unpickler with globals from the allowlist and BUILD limited to numpy state."""

    dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

    def find_class(self, module: str, name: str) -> Any:
        return resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise Refusal(f"persistent id {pid!r}")

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, np.ndarray):
            set_array_state(target, state)
        elif isinstance(target, np.dtype):
            set_dtype_state(target, state)
        else:
            raise Refusal(f"state for a {type(target).__name__} (only numpy arrays and dtypes take state)")

    dispatch[pickle.BUILD[0]] = load_build

    def load_extension(self) -> None:
        raise Refusal("a copyreg extension code (these bypass the global allowlist)")

    for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = load_extension
    del _opcode


def _as_params(tree: Any, path: str) -> Params:
    """Checks the unpickled object is `{str: {str: array}}` and returns plain dicts of ndarrays."""

    def fail(found: str) -> None:
        raise ValueError(
            f"{path} is not a Haiku parameter file: expected {{module path: {{leaf name: array}}}},"
            f" found {found}"
        )

    if not isinstance(tree, Mapping):
        fail(f"a {type(tree).__name__} at the top level")
    params: Params = {}
    for module, leaves in tree.items():
        if not isinstance(module, str) or not isinstance(leaves, Mapping):
            fail(f"{module!r} -> {type(leaves).__name__}")
        params[module] = {}
        for leaf, value in leaves.items():
            if not isinstance(leaf, str) or not isinstance(value, (np.ndarray, np.generic)):
                fail(f"{module}/{leaf!r} -> {type(value).__name__}")
            value = np.asarray(value)
            if value.dtype.hasobject:
                fail(f"{module}/{leaf} -> an array of Python objects")
            params[module][leaf] = value
    return params


def load_deepmind_params(path: str | os.PathLike) -> Params:
    """Loads a released `F*_haiku.npz` (a dill pickle) as Haiku params, running no code from it.

    Returns `{module path: {leaf: np.ndarray}}`, directly usable as the `params` of the official
    architecture under `hk.transform` (names per docs/official_code_notes.md; HWIO conv kernels).
    Raises `UnsafeCheckpointError` naming the first global or operation outside the allowlist,
    and `ValueError` for a file that is not a pickled parameter tree (e.g. truncated).
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        if file.read(4) == b"PK\x03\x04":
            raise ValueError(
                f"{path} is a NumPy .npz (zip) archive, not one of DeepMind's pickled weight files: "
                "load it with nfnets_jax.weights.load_npz"
            )
        file.seek(0)
        tree = _unpickle(file, path)
    return _as_params(tree, path)


def _unpickle(file: BinaryIO, path: str) -> Any:
    """Runs the restricted unpickler, naming the file in every error it can raise."""
    try:
        return _RestrictedUnpickler(file, encoding="latin1").load()
    except Refusal as refusal:
        raise UnsafeCheckpointError(f"refusing to load {refusal} from {path}: {_EXPLANATION}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, struct.error) as error:
        raise ValueError(
            f"could not read {path} as a DeepMind weight pickle ({type(error).__name__}: {error});"
            " the file may be truncated or corrupt: download it again and compare its sha256"
        ) from error
