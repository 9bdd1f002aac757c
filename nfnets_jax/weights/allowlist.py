"""What a DeepMind weight pickle may name, each re-implemented so that naming it runs no foreign code.

A pickle rebuilds objects by calling globals it names (`module.name`). DeepMind's released NFNet
files (docs/official_code_notes.md: dill pickles of `{module: {leaf: array}}` from early 2021, haiku
0.0.3, jax 0.2.x, numpy 1.x) need only the names below; the restricted unpickler resolves every
global through `resolve`, and each name maps to a small function here that accepts only the
arguments a genuine file passes:

- numpy arrays: `numpy.core.multiarray._reconstruct` + `numpy.ndarray` + `numpy.dtype` (protocols
  0-4), `numpy.core.numeric._frombuffer` (protocol 5), `numpy.core.multiarray.scalar` (numpy
  scalars), `_codecs.encode` (bytes under protocols 0-2; `bytes()` with no argument for empty
  data), and the same under numpy 2's `numpy._core`;
- dill's indirections: dill 0.3.x writes numpy's C function `_reconstruct` as `dill._dill._get_attr(
  dill._dill._import_module('numpy.core._multiarray_umath'), '_reconstruct')`; dill 0.3.6+ wraps
  every array in `dill._dill._create_array(f, args, state, npdict)`; `_load_type` names builtin types;
- Haiku's mappings: `haiku._src.data_structures.FlatMapping(mapping)` (today's haiku still pickles
  its `FlatMap` under that old name), `FlatMap` and `frozendict(storage)` all become `dict`;
- jax arrays: jax 0.2.2x-0.4 pickled a DeviceArray as `jax._src.device_array.reconstruct_device_array(
  fun, args, arr_state, aval_state)`; it becomes the numpy value (`aval_state` holds only
  `weak_type`-style tracing metadata). Earlier jax pickled DeviceArrays as plain numpy arrays.

Anything else raises `Refusal` naming it; nothing is ever imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np


class Refusal(Exception):
    """Raised while unpickling; the loader turns it into UnsafeCheckpointError with the path."""


@dataclasses.dataclass(frozen=True)
class _ModuleToken:
    """Stands for a module that dill's `_import_module` named; never a real module object."""

    name: str


class _NdarrayTypeToken:
    """Stands for `numpy.ndarray` so the file can name the array type but never call it."""


_NDARRAY = _NdarrayTypeToken()


def _refuse(what: str) -> NoReturn:
    raise Refusal(what)


def _checked_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        _refuse(f"an array whose dtype is a {type(dtype).__name__}")
    if dtype.hasobject:
        _refuse("an array of Python objects (dtype 'O')")
    return dtype


def _make_dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
    """`numpy.dtype(spec, align, copy)`, refusing object dtypes (their items are pickles).

    Always a private copy (numpy's own pickles ask for one too), so the BUILD that follows can
    never reach one of numpy's process-wide builtin descriptors.
    """
    del copy
    return _checked_dtype(np.dtype(spec, align=bool(align), copy=True))


def set_dtype_state(dtype: np.dtype, state: Any) -> None:
    """BUILD on a dtype, allowed only to restate what the dtype already is (byte order aside).

    `numpy.dtype.__setstate__` trusts its input: it rewrites the item size of a void dtype and
    its flags (including "holds Python objects") in place, after arrays may already use that
    dtype object. A file could thus make a 1-byte array claim megabytes (reading the process's
    heap into a "weight") or make raw bytes count as object pointers. A genuine file only ever
    BUILDs a fresh dtype with the state `dtype.__reduce__()` gives, except that a big-endian
    numeric dtype arrives as the native one plus byte order '>'. Anything else is refused.
    """
    _checked_dtype(dtype)
    own_state = dtype.__reduce__()[2]
    byteorder_may_change = dtype.fields is None and dtype.subdtype is None and dtype.kind != "V"
    if (
        not isinstance(state, tuple)
        or len(state) != len(own_state)
        or state[1] not in ("<", ">", "=", "|")
        or (state[1] != own_state[1] and not byteorder_may_change)
        or not _same_state(state[:1] + state[2:], own_state[:1] + own_state[2:])
    ):
        _refuse(
            f"a dtype state {state!r} that would change the {dtype} dtype's layout (only plain"
            " dtypes restating their own layout are accepted; structured and datetime arrays"
            " never occur in weight files)"
        )
    itemsize, flags = dtype.itemsize, dtype.flags
    dtype.__setstate__(state)
    if dtype.itemsize != itemsize or dtype.flags != flags:  # Belt and braces: must not happen.
        _refuse(f"a dtype state {state!r} that changed the dtype's layout")


def _same_state(given: tuple, own: tuple) -> bool:
    """Element-wise equality that never lets numpy coerce a non-dtype (`dtype('f4') == 'f4'`)."""
    if type(given) is not type(own):
        return False
    if isinstance(own, tuple):
        return len(given) == len(own) and all(_same_state(g, o) for g, o in zip(given, own))
    if isinstance(own, dict):
        return given.keys() == own.keys() and all(_same_state(given[k], own[k]) for k in own)
    return bool(given == own)


def set_array_state(array: np.ndarray, state: Any) -> None:
    """BUILD on an ndarray (`ndarray.__setstate__`), refusing a result that holds Python objects."""
    array.__setstate__(state)
    _checked_dtype(array.dtype)


def _reconstruct_array(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """numpy's `_reconstruct`: an empty ndarray that the following BUILD fills via __setstate__."""
    del dtype_code  # numpy writes b'b'; __setstate__ replaces the dtype and the data.
    if subtype is not _NDARRAY:
        _refuse(f"an array of type {subtype!r} (only numpy.ndarray is allowed)")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        _refuse(f"an array placeholder with shape {shape!r}")
    # numpy writes shape (0,); BUILD then sets the real shape from data it holds. Allocating
    # the placeholder's declared shape would let a crafted file ask for terabytes up front.
    return np.empty((0,), dtype=np.int8)


def _array_from_buffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's `_frombuffer` (pickle protocol 5): the data arrives in-band as bytes."""
    if not isinstance(buffer, (bytes, bytearray)):
        _refuse(f"array data held in a {type(buffer).__name__}")
    if order not in ("C", "F"):
        _refuse(f"array memory order {order!r}")
    return np.frombuffer(buffer, dtype=_checked_dtype(dtype)).reshape(shape, order=order)


def _reconstruct_scalar(dtype: Any, data: Any) -> np.generic:
    """numpy's `multiarray.scalar(dtype, raw bytes)` for 0-d values saved as numpy scalars."""
    dtype = _checked_dtype(dtype)
    if isinstance(data, str):  # protocol 0-2 from Python 2 era numpy writes latin-1 text.
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        _refuse(f"a numpy scalar built from {type(data).__name__}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode(text, 'latin1')`: how protocol 0-2 pickles spell a bytes object."""
    if not isinstance(text, str) or encoding.lower() not in ("latin1", "latin-1"):
        _refuse(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()`: how protocols 0-2 spell the empty data of a zero-size array; nothing else."""
    if args:
        _refuse(f"builtins.bytes called with {len(args)} argument(s)")
    return b""


def _fill_array(constructor: Any, args: Any, state: Any) -> np.ndarray:
    """Builds an array the way `_reconstruct` + BUILD does, from already-vetted parts."""
    if constructor is not _reconstruct_array:
        _refuse(f"array constructor {constructor!r}")
    array = constructor(*args)
    set_array_state(array, state)
    return array


def _dill_create_array(constructor: Any, args: Any, state: Any, npdict: Any = None) -> np.ndarray:
    """dill's `_create_array(f, args, state, npdict)`; `npdict` (subclass attributes) is dropped."""
    del npdict  # Attributes of an ndarray subclass instance; a plain ndarray cannot hold them.
    return _fill_array(constructor, args, state)


def _reconstruct_device_array(constructor: Any, args: Any, arr_state: Any, aval_state: Any) -> np.ndarray:
    """jax's `reconstruct_device_array`: the numpy value; `aval_state` (weak_type) is metadata."""
    del aval_state
    return _fill_array(constructor, args, arr_state)


class _HaikuMappingAsDict:
    """Old Haiku mappings (`FlatMapping(mapping)`, `frozendict(storage)`) load as plain dicts."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:  # type: ignore[misc]
        return dict(*args, **kwargs)


_PLAIN_TYPES: Mapping[str, type] = MappingProxyType(
    {t.__name__: t for t in (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, complex, bool)}
)


def _dill_load_type(name: Any) -> type:
    """dill's `_load_type(name)`, limited to builtin container and number types."""
    if name not in _PLAIN_TYPES:
        _refuse(f"type {name!r} via dill._dill._load_type")
    return _PLAIN_TYPES[name]


_NUMPY_MULTIARRAY_MODULES = (
    "numpy.core.multiarray",
    "numpy._core.multiarray",
    "numpy.core._multiarray_umath",
    "numpy._core._multiarray_umath",
)
_NUMPY_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_HAIKU_MODULES = ("haiku._src.data_structures", "haiku.data_structures")
_DILL_MODULES = ("dill._dill", "dill.dill")
_JAX_DEVICE_ARRAY_MODULES = ("jax._src.device_array", "jax.interpreters.xla")


def _dill_import_module(name: Any, safe: bool = False) -> _ModuleToken:
    """dill's `_import_module(name)`, limited to numpy's array modules; imports nothing."""
    del safe
    if name not in _NUMPY_MULTIARRAY_MODULES + _NUMPY_NUMERIC_MODULES + ("numpy",):
        _refuse(f"module {name!r} via dill._dill._import_module")
    return _ModuleToken(name)


def _dill_get_attr(owner: Any, name: Any) -> Any:
    """dill's `_get_attr(module, name)` for a builtin function: resolved through the allowlist."""
    if not isinstance(owner, _ModuleToken):
        _refuse(f"attribute {name!r} of a {type(owner).__name__} via dill._dill._get_attr")
    return resolve(owner.name, str(name))


def _build_allowlist() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _make_dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): dict,
    }
    for module in _NUMPY_MULTIARRAY_MODULES:
        allowed[(module, "_reconstruct")] = _reconstruct_array
        allowed[(module, "scalar")] = _reconstruct_scalar
    for module in _NUMPY_NUMERIC_MODULES:
        allowed[(module, "_frombuffer")] = _array_from_buffer
    for module in ("builtins", "__builtin__"):
        for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "complex"):
            allowed[(module, name)] = _PLAIN_TYPES[name]
        allowed[(module, "bytes")] = _empty_bytes
    for module in _HAIKU_MODULES:
        for name in ("FlatMapping", "FlatMap", "frozendict"):
            allowed[(module, name)] = _HaikuMappingAsDict
    for module in _DILL_MODULES:
        allowed[(module, "_get_attr")] = _dill_get_attr
        allowed[(module, "_import_module")] = _dill_import_module
        allowed[(module, "_create_array")] = _dill_create_array
        allowed[(module, "_load_type")] = _dill_load_type
    for module in _JAX_DEVICE_ARRAY_MODULES:
        allowed[(module, "reconstruct_device_array")] = _reconstruct_device_array
    return allowed


_ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = MappingProxyType(_build_allowlist())


def resolve(module: str, name: str) -> Any:
    """The safe stand-in for global `module.name`, or `Refusal` naming it."""
    try:
        return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
        raise Refusal(f"global '{module}.{name}'") from None


def allowed_globals() -> list[str]:
    """The `module.name` globals a weight file may reference, for audits and error reports."""
    return sorted(f"{module}.{name}" for module, name in _ALLOWED_GLOBALS)
