"""Workdir paths: one abstraction for local directories and object stores (`gs://bucket/run`).

Every file a run reads or writes in its workdir (metrics, config, curves, TensorBoard events,
the lock, checkpoint housekeeping) goes through `as_path`, an `etils.epath.Path`: plain `os` calls
for local paths, `tf.io.gfile` for `gs://` (epath's choice when TensorFlow is installed, as it is
for the input pipeline). Object stores have no atomic rename of directories, no append and no
exclusive create, so the few operations that need those guarantees are here, written for both:

- `write_text_atomically`: readers see the old or the new content, never a half-written file
  (a local write goes to a temporary file renamed over the target; one object write is atomic).
- `compare_and_swap`: create-if-absent and replace-if-unchanged of one small file, through
  TensorStore's conditional writes (`ifGenerationMatch` on GCS, a lock file locally); the
  workdir lock is built on it.
- `checkpoint_location`: the directory handed to orbax, which accepts local absolute paths and
  `gs://` URLs (TensorStore's own GCS driver writes the arrays).

A filesystem registered with epath under another URL scheme (tests register a fake object store,
see `tests/fake_object_store.py`) may say where orbax and TensorStore should write by
defining `checkpoint_location()` and `tensorstore_kvstore()`.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from etils import epath

Path = epath.Path


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (an object store), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """The workdir (or a file in it) as an epath Path; local paths are made absolute."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(text))


def checkpoint_location(path: epath.Path) -> epath.Path:
    """What orbax gets for `path`: the path itself (local or `gs://`) unless its filesystem
    says otherwise (a test double backed by a local directory)."""
    locate = getattr(path, "checkpoint_location", None)
    return locate() if locate is not None else path


def tensorstore_kvstore(directory: epath.Path) -> dict[str, Any]:
    """A TensorStore key-value store spec for the files directly inside `directory`."""
    custom = getattr(directory, "tensorstore_kvstore", None)
    if custom is not None:
        return custom()
    text = str(directory).rstrip("/")
    if text.startswith("gs://"):
        bucket, _, prefix = text[len("gs://"):].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/" if prefix else ""}
    if is_url(text):
        raise ValueError(f"Workdirs on {text.split('://')[0]}:// are not supported: use a local "
                         "path or gs://bucket/path.")
    return {"driver": "file", "path": f"{text}/"}


def write_text_atomically(path: epath.Path, text: str) -> None:
    """Replaces `path`'s content with `text`; readers never see a partial file."""
    if is_url(path):
        path.write_text(text)  # one object upload: atomic on object stores
        return
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    temporary.write_text(text)
    temporary.replace(path)


def compare_and_swap(path: epath.Path, expected: bytes | None, new: bytes | None) -> bool:
    """Writes `new` (None deletes) to `path` only if its content is still `expected` (None: the
    file must not exist). Returns whether the write happened; exactly one of several concurrent
    callers expecting the same content wins."""
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    store = ts.KvStore.open(tensorstore_kvstore(path.parent)).result()
    current = store.read(path.name).result()
    present = current.state == "value"
    if (expected is None and present) or (expected is not None and (not present or current.value != expected)):
        return False
    # A failed condition leaves the file alone and returns an empty generation.
    return bool(store.write(path.name, new, if_equal=current.stamp.generation).result().generation)


def read_bytes_or_none(path: epath.Path) -> bytes | None:
    """The file's content, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except Exception:  # pylint: disable=broad-except
        if not path.exists():  # tf.io.gfile raises its own NotFoundError
            return None
        raise
