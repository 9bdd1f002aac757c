"""A fake object store for tests: `fakegs://bucket/run` URLs backed by a local directory.

Tests of `gs://` workdirs cannot reach Google Cloud Storage, so they register this store with
epath (`register(root)`) and pass `fakegs://...` workdirs. Every access that goes through
`workdir.as_path` lands under `root`; code that bypasses it (`open`, `os.makedirs`, `shutil`
on the URL string) fails or writes a stray `fakegs:` folder in the working directory, which the
tests look for. Orbax and TensorStore only speak local paths and `gs://`, so the store tells them
its backing directory (`checkpoint_location`, `tensorstore_kvstore`): what is tested on the fake
store is this package's own file handling, not TensorStore's GCS driver.

The root is passed in the environment variable `NFNETS_FAKE_OBJECT_STORE`, so that child
processes see the same store once they call `register()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

SCHEME = "fakegs"
ENV_ROOT = "NFNETS_FAKE_OBJECT_STORE"
_PREFIX = f"{SCHEME}://"


def _root() -> str:
    root = os.environ.get(ENV_ROOT)
    if not root:
        raise RuntimeError(f"{_PREFIX} URLs need {ENV_ROOT} (see fake_object_store.register).")
    return root


def _local(path: Any) -> str:
    text = os.fspath(path)
    if text.startswith(_root()):  # already translated (the os backend calls itself)
        return text
    if not text.startswith(_PREFIX):
        raise ValueError(f"{text} is not a {_PREFIX} URL")
    return os.path.join(_root(), text[len(_PREFIX):])


def _url(local: Any) -> str:
    relative = os.path.relpath(os.fspath(local), _root())
    return _PREFIX + ("" if relative == "." else relative)


class _Backend(backend_lib._OsPathBackend):  # pylint: disable=protected-access
    """os operations on the backing directory of `fakegs://` URLs."""

    def open(self, path, mode):
        return super().open(_local(path), mode)

    def exists(self, path):
        return super().exists(_local(path))

    def isdir(self, path):
        return super().isdir(_local(path))

    def listdir(self, path):
        return super().listdir(_local(path))

    def glob(self, path):
        return [_url(match) for match in super().glob(_local(path))]

    def walk(self, top, *, top_down=True, on_error=None) -> Iterator[tuple[str, list[str], list[str]]]:
        for root, dirs, files in super().walk(_local(top), top_down=top_down, on_error=on_error):
            yield _url(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(_local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(_local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(_local(path))

    def remove(self, path):
        return super().remove(_local(path))

    def rename(self, path, dst):
        return super().rename(_local(path), _local(dst))

    def replace(self, path, dst):
        return super().replace(_local(path), _local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(_local(path), _local(dst), overwrite)

    def stat(self, path):
        return super().stat(_local(path))


_BACKEND = _Backend()


class FakeObjectStorePath(gpath.PosixGPath):
    """`fakegs://bucket/path`: an epath Path whose files live under `$NFNETS_FAKE_OBJECT_STORE`."""

    def __new__(cls, *parts: Any):
        text = "/".join(os.fspath(part) for part in parts)
        if text.startswith(_PREFIX):
            text = f"/{SCHEME}/" + text[len(_PREFIX):]
        return super().__new__(cls, text)

    @property
    def _uri_scheme(self) -> str | None:
        return SCHEME if len(self.parts) >= 2 and self.parts[:2] == ("/", SCHEME) else None

    @property
    def _backend(self) -> backend_lib.Backend:
        return _BACKEND

    def checkpoint_location(self) -> epath.Path:
        """Where orbax writes this directory (it accepts only local paths and `gs://`)."""
        return epath.Path(_local(self))

    def tensorstore_kvstore(self) -> dict[str, Any]:
        return {"driver": "file", "path": _local(self).rstrip("/") + "/"}


def register(root: str | None = None) -> None:
    """Makes `fakegs://` URLs resolve under `root` (or the root already in the environment)."""
    if root is not None:
        os.makedirs(root, exist_ok=True)
        os.environ[ENV_ROOT] = os.path.abspath(root)
    epath.register_path_cls(_PREFIX)(FakeObjectStorePath)
