"""Reads and writes `.safetensors` files with NumPy alone: no torch, no `safetensors` package, no code run.

The format (https://huggingface.co/docs/safetensors, "Format" section) is an 8-byte little-endian
unsigned header length N, then N bytes of UTF-8 JSON `{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}`, then the raw little-endian tensor bytes; offsets are
relative to the end of the header. Nothing in it is executable, which is why it is the safer of
the two ways pretrained NFNets are distributed (DeepMind's are pickles).

A file is untrusted input, so everything the header claims is checked against the file's real
size before a single tensor is allocated: the header length, every dtype and shape, that each
byte range lies inside the data section and has exactly the size its shape needs, and that the
ranges neither overlap nor leave holes (the format requires the data to be fully indexed). The
header's JSON is parsed in bounded depth and linear time (`bounded_json`). A file that fails any
check raises `SafetensorsFormatError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from nfnets_jax.weights import bounded_json
from nfnets_jax.weights.atomic_write import replaced_atomically

# The reference implementation refuses headers over 100 MB; a real header is a few hundred KB.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
_HEADER_DEPTH = 3  # the header object, an entry object, its shape list
# Safetensors dtype codes this reader supports (the format stores them little-endian).
DTYPES: Mapping[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsFormatError(ValueError):
    """A file is not a well-formed safetensors file (or uses a dtype this reader refuses)."""


def _fail(path: str, problem: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(f"{path} is not a valid safetensors file: {problem}")


def _read_header(file: Any, path: str, file_size: int) -> tuple[dict[str, Any], int]:
    """(parsed JSON header, offset of the data section), after checking the length prefix."""
    if file_size < 8:
        raise _fail(path, f"it has {file_size} bytes, fewer than the 8-byte header length")
    header_size = int.from_bytes(file.read(8), "little")
    if header_size > min(MAX_HEADER_BYTES, file_size - 8):
        raise _fail(
            path,
            f"its header claims {header_size} bytes but the file has {file_size - 8} after the length"
            f" prefix (limit {MAX_HEADER_BYTES}); the file is truncated or not safetensors",
        )

    raw = file.read(header_size)
    try:  # a header is {name: {dtype, shape: [...], data_offsets: [...]}, __metadata__: {...}}
        header = bounded_json.load_bounded(raw, max_depth=_HEADER_DEPTH)
    except bounded_json.BoundedJsonError as error:
        raise _fail(path, f"its header is refused: {error}") from None
    if not isinstance(header, dict):
        raise _fail(path, f"its header is a JSON {type(header).__name__}, not an object")
    return header, 8 + header_size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_layout(name: str, entry: Any, path: str, data_size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked against the data section."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"entry {name!r} must be an object with exactly dtype, shape and data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise _fail(path, f"tensor {name!r} has dtype {code!r}; this reader supports {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r} has shape {shape!r}; expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _fail(path, f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _fail(
            path,
            f"tensor {name!r} spans bytes [{begin}, {end}) but the data section has {data_size} bytes"
            " (truncated file or corrupt offsets)",
        )
    dtype = DTYPES[code]
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise _fail(path, f"tensor {name!r} of {code} shape {shape} needs {needed} bytes, its offsets give {end - begin}")
    return dtype, tuple(shape), begin, end


def _check_tiling(spans: list[tuple[int, int, str]], path: str, data_size: int) -> None:
    """The byte ranges must cover the data section exactly once: no overlap, no hole."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise _fail(path, f"tensors {previous!r} and {name!r} overlap (bytes from {begin} are claimed twice)")
        if begin > position:
            raise _fail(path, f"bytes [{position}, {begin}) of the data section belong to no tensor")
        position, previous = end, name
    if position != data_size:
        raise _fail(path, f"bytes [{position}, {data_size}) of the data section belong to no tensor")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as NumPy arrays (F32, F16 or BF16), in header order.

    The whole header is validated before any tensor is allocated (see the module docstring);
    `__metadata__` is checked to be a string map and otherwise ignored.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        header, data_start = _read_header(file, path, file_size)
        metadata = header.pop(METADATA_KEY, {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _fail(path, f"its {METADATA_KEY} must map strings to strings, got {metadata!r}")
        data_size = file_size - data_start
        layouts = {name: _entry_layout(name, entry, path, data_size) for name, entry in header.items()}
        _check_tiling([(begin, end, name) for name, (_, _, begin, end) in layouts.items()], path, data_size)

        tensors = {}
        for name, (dtype, shape, begin, end) in layouts.items():
            array = np.empty(shape, dtype=dtype)
            file.seek(data_start + begin)
            if file.readinto(array.reshape(-1).view(np.uint8)) != end - begin:
                raise _fail(path, f"the file ended while reading tensor {name!r} (changed while being read?)")
            tensors[name] = array
    return tensors


def looks_like_safetensors(path: str | os.PathLike) -> bool:
    """True if `path` is named `*.safetensors` or starts like one (length prefix, then `{`).

    DeepMind's pickles start with byte 0x80 and our `.npz` with `PK`, so the content tells the
    three weight formats apart whatever the file is called; the name makes a damaged
    `.safetensors` file get this reader's error rather than another format's.
    """
    if os.fspath(path).endswith(".safetensors"):
        return True
    with open(path, "rb") as file:
        prefix = file.read(9)
    return len(prefix) == 9 and prefix[8:9] == b"{" and int.from_bytes(prefix[:8], "little") > 1


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes `name -> array` (float32, float16 or bfloat16) as a `.safetensors` file, atomically.

    Tensors are laid out in the mapping's order, little-endian and contiguous, and the header is
    padded with spaces to a multiple of 8 bytes, as the reference implementation does, so that
    each tensor starts aligned. Written to a temporary name beside `path`, then renamed
    (`atomic_write`).
    Used to hand our params to timm's side of the format (`timm_nfnet.to_timm_state_dict`).
    """
    header: dict[str, Any] = {}
    arrays = []
    offset = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        code = _CODE_OF_DTYPE.get(array.dtype.newbyteorder("<"))
        if code is None:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; safetensors files here hold "
                             f"{sorted(DTYPES)} ({', '.join(str(d) for d in DTYPES.values())})")
        array = np.asarray(array, dtype=DTYPES[code], order="C")  # (ascontiguousarray makes 0-d 1-d)
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    if metadata:
        header[METADATA_KEY] = {str(key): str(value) for key, value in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with replaced_atomically(path) as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for array in arrays:
            file.write(array.reshape(-1).view(np.uint8).tobytes())
