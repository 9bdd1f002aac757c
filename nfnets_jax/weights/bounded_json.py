"""JSON from an untrusted file, parsed in bounded depth and linear time.

A weight file's JSON (a safetensors header, our `.npz`'s dtype record) is input an attacker may
write. Python's `json` recurses once per nesting level, so a header nested 100,000 deep ends in an
uncaught `RecursionError`; and a duplicate-key check that compares every key with every other
takes hours on a header at the format's 100 MB limit. `load_bounded` measures the nesting depth
before parsing (one vectorised pass over the text, strings blanked out first) and checks
duplicate keys with a set, so any input is refused or parsed in time proportional to its size.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Any

import numpy as np

# A JSON string literal, unrolled so that the regular expression engine never backtracks.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


class BoundedJsonError(ValueError):
    """The JSON is malformed, nested deeper than allowed, or repeats a key (the message says which)."""


def nesting_depth(text: bytes) -> int:
    """The deepest nesting of objects and arrays in JSON `text` (0 for a scalar), in linear time."""
    skeleton = np.frombuffer(_STRING.sub(b'""', text), np.uint8)
    opens = (skeleton == ord("{")) | (skeleton == ord("["))
    closes = (skeleton == ord("}")) | (skeleton == ord("]"))
    depth = np.cumsum(opens.astype(np.int64) - closes.astype(np.int64))
    return int(depth.max()) if depth.size else 0


def _without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        repeated = sorted(key for key, count in collections.Counter(key for key, _ in pairs).items() if count > 1)
        raise BoundedJsonError(f"it names {repeated[:5]}{' ...' if len(repeated) > 5 else ''} more than once")
    return result


def load_bounded(text: bytes, *, max_depth: int) -> Any:
    """`json.loads(text)` for untrusted input: refuses (`BoundedJsonError`) text that is not UTF-8
    JSON, nests objects and arrays deeper than `max_depth`, or repeats a key in an object."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise BoundedJsonError(f"it nests {depth} levels deep, more than the {max_depth} its format has")
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_without_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BoundedJsonError(f"it is not UTF-8 JSON ({error})") from None
