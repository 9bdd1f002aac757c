"""Downloads a file atomically and verifies its sha256, so a cached weight file is whole and genuine.

The bytes go to a temporary file beside the destination while their sha256 is computed; only a
complete file whose digest matches the pinned one (when given) is renamed into place. A failed or
mismatched download leaves nothing behind, and an existing file at the destination is untouched.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import urllib.parse
import urllib.request

from nfnets_jax.weights.atomic_write import replaced_atomically

_ALLOWED_SCHEMES = ("https", "http", "file")
_CHUNK_BYTES = 1 << 20


class ChecksumMismatchError(ValueError):
    """A downloaded or cached file's sha256 differs from the pinned digest."""


def normalize_sha256(sha256: str | None) -> str | None:
    """Lower-case hex digest, or None; raises early on anything that is not 64 hex digits."""
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return digest


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks (released weight files are up to ~1.8 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, *, timeout_s: float = 60.0) -> str:
    """Downloads `url` to `dest` atomically and returns the file's sha256 (pin it next time).

    With `sha256` given, a file whose digest differs raises `ChecksumMismatchError` and is deleted;
    `dest` is then exactly as before the call. `file://` URLs work too (mirrors, tests).
    """
    expected = normalize_sha256(sha256)
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in _ALLOWED_SCHEMES:
        raise ValueError(f"download URL must use one of {_ALLOWED_SCHEMES}, got {url!r}")
    with replaced_atomically(dest, suffix=".part") as out:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            while chunk := response.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise ChecksumMismatchError(
                f"{url} has sha256 {actual}, but {expected} was pinned; the file was not saved to"
                f" {dest}. Either the download is corrupt or the pinned digest is wrong."
            )
    return actual
