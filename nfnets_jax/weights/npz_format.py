"""Our own parameter files: a plain NumPy `.npz` (a zip of `.npy` files), never a pickle.

Keys are `module/leaf` (split on the last '/', see `param_tree`). Values are written and read with
pickling disabled, so loading one of these files can never run code. NumPy has no bfloat16: an
`ml_dtypes` array (bfloat16, float8_*, int4, ...) written as-is would come back as raw void bytes
(`|V2`), so such leaves are stored as their unsigned-integer bit pattern and a JSON record under
the key `__dtypes__` names the real dtype; loading views the bits back, giving an exact round trip.
"""

from __future__ import annotations

import json
import os
import pathlib
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from nfnets_jax.weights import bounded_json
from nfnets_jax.weights.atomic_write import replaced_atomically
from nfnets_jax.weights.param_tree import Params, ParamTree, flatten_params, unflatten_params

DTYPES_KEY = "__dtypes__"  # No '/', so it can never collide with a 'module/leaf' key.


def _ml_dtype_name(dtype: np.dtype) -> str | None:
    """The `ml_dtypes` attribute name of `dtype` if NumPy cannot store it natively, else None."""
    candidate = getattr(ml_dtypes, dtype.name, None)
    if candidate is not None and np.dtype(candidate) == dtype:
        return dtype.name
    return None


def _bits_dtype(itemsize: int) -> np.dtype:
    return np.dtype(f"<u{itemsize}")


def _to_storable(key: str, value: Any, dtype_record: dict[str, str]) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise TypeError(
            f"param {key} holds Python objects (dtype {array.dtype}); only numeric arrays can be saved"
        )
    name = _ml_dtype_name(array.dtype)
    if name is None:
        return array
    dtype_record[key] = name
    return array.view(_bits_dtype(array.dtype.itemsize))


def save_npz(path: str | os.PathLike, params: ParamTree) -> None:
    """Writes `{module: {leaf: array}}` to `path` as an `.npz` with '/'-joined keys, atomically.

    The file is written to a temporary name beside `path` and renamed over it, so a crash never
    leaves a half-written parameter file. jax arrays are fetched to host memory first.
    """
    path = pathlib.Path(path)
    dtype_record: dict[str, str] = {}
    arrays = {key: _to_storable(key, value, dtype_record) for key, value in flatten_params(params).items()}
    if dtype_record:
        arrays[DTYPES_KEY] = np.array(json.dumps(dtype_record, sort_keys=True))
    with replaced_atomically(path) as file:
        np.savez(file, allow_pickle=False, **arrays)


def _restore_dtype(key: str, bits: np.ndarray, name: str, path: str) -> np.ndarray:
    # Only ml_dtypes' scalar types: the name comes from the file, and other attributes of the
    # module (`finfo`, `real`, ...) would make np.dtype an object dtype.
    dtype = getattr(ml_dtypes, name, None) if isinstance(name, str) else None
    if (
        not (isinstance(dtype, type) and issubclass(dtype, np.generic))
        or np.dtype(dtype).itemsize != bits.dtype.itemsize
    ):
        raise ValueError(
            f"{path}: param {key} records dtype {name!r}, which ml_dtypes {ml_dtypes.__version__}"
            " cannot restore; install the ml_dtypes version that wrote the file"
        )
    return bits.view(np.dtype(dtype))


def _check_declared_sizes(path: str) -> None:
    """Refuses members whose `.npy` header declares more data than the member holds.

    A crafted header can declare terabytes; numpy would try to allocate them before reading a
    byte (a MemoryError that names no file). The header is read first and compared with the
    member's uncompressed size in the zip directory, so nothing large is ever allocated.
    """
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                continue
            with archive.open(member) as stream:
                try:
                    major, _ = np.lib.format.read_magic(stream)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(stream)
                except ValueError as error:
                    raise ValueError(f"{path}: member {member.filename} has an unreadable .npy header "
                                     f"({error}); the file is corrupt or not ours") from None
                header_size = stream.tell()
            declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if declared > member.file_size - header_size:
                raise ValueError(
                    f"{path}: member {member.filename} declares {dtype}{list(shape)} ({declared:,} "
                    f"bytes) but holds {member.file_size - header_size:,} bytes of data; refusing to "
                    "load a corrupt or crafted file")


def load_npz(path: str | os.PathLike) -> Params:
    """Reads a file written by `save_npz` back into `{module: {leaf: np.ndarray}}` (no pickle)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not an .npz archive; if it is one of DeepMind's released F*_haiku.npz files"
            " (a pickle), load it with nfnets_jax.weights.load_deepmind_params"
        )
    _check_declared_sizes(path)
    with np.load(path, allow_pickle=False) as archive:
        flat = {key: archive[key] for key in archive.files}
    record = flat.pop(DTYPES_KEY, None)
    dtype_record = {}
    if record is not None:
        if record.dtype.kind not in "US" or record.shape != ():
            raise ValueError(f"{path}: the {DTYPES_KEY} record must be one JSON string, got {record.dtype}"
                             f"{list(record.shape)}")
        try:  # {param: ml_dtypes name}: one level
            dtype_record = bounded_json.load_bounded(str(record).encode("utf-8"), max_depth=1)
        except bounded_json.BoundedJsonError as error:
            raise ValueError(f"{path}: the {DTYPES_KEY} record is refused: {error}") from None
    if not isinstance(dtype_record, dict):
        raise ValueError(f"{path}: the {DTYPES_KEY} record must be a JSON object, got {dtype_record!r}")
    for key, name in dtype_record.items():
        if key not in flat:
            raise ValueError(f"{path}: dtype record names param {key}, which the file does not hold")
        flat[key] = _restore_dtype(key, flat[key], name, path)
    return unflatten_params(flat)
