"""Files that appear whole or not at all: written under a temporary name beside the target, then
renamed over it (`os.replace` is atomic within one filesystem).

A crash, a full disk or a failed check mid-write leaves the target exactly as it was and no
temporary file behind; every weight file this package writes or downloads goes through here.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file to write; on leaving the block it replaces `path`, unless the block raised
    (a checksum that does not match, say), in which case it is deleted and `path` is untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
        os.replace(temp_name, path)
    except BaseException:
        pathlib.Path(temp_name).unlink(missing_ok=True)
        raise
