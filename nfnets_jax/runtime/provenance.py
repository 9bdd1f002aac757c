"""What produced a result: package versions, the git commit, the machine and its devices.

A number is only reproducible with the environment that gave it, and `>=` requirements resolve to
new releases without any commit. So every workdir gets a `provenance.json` beside its
`config.json`, and every benchmark's JSON line carries the same record under "provenance".

Versions are read from the installed distributions' metadata (`importlib.metadata`), so asking
for TensorFlow's version does not import TensorFlow.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any

PROVENANCE_FILE = "provenance.json"

# Record key -> the distributions that provide it, first installed one wins (TensorFlow ships
# as `tensorflow` or, CPU-only, as `tensorflow-cpu`).
PACKAGES: dict[str, tuple[str, ...]] = {
    "nfnets-jax": ("nfnets-jax",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "dm-haiku": ("dm-haiku",),
    "optax": ("optax",),
    "orbax-checkpoint": ("orbax-checkpoint",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "tensorflow-datasets": ("tensorflow-datasets",),
    "numpy": ("numpy",),
    "ml-collections": ("ml-collections", "ml_collections"),
    "libtpu": ("libtpu",),  # the TPU compiler (the tpu-plan extra), where installed
}

_MAX_UNTRACKED = 50
_CHECKOUT = pathlib.Path(__file__).resolve().parents[2]  # nfnets_jax/runtime/ -> the checkout


def package_versions() -> dict[str, str | None]:
    """Installed version of each package of `PACKAGES` (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for key, distributions in PACKAGES.items():
        versions[key] = None
        for distribution in distributions:
            try:
                versions[key] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def git_state() -> dict[str, Any] | None:
    """The commit of the checkout this code runs from, and whether the tree differs from it.

    `dirty` is True when tracked files are modified or files that git does not ignore are untracked
    (a new module or config changes what runs as surely as an edit); `untracked` lists the latter
    (the first `_MAX_UNTRACKED`). None for an installed copy (site-packages) that is not a checkout,
    even when it sits inside some other git repository.
    """
    toplevel = _git("rev-parse", "--show-toplevel")
    if not toplevel or pathlib.Path(toplevel).resolve() != _CHECKOUT:
        return None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=all")
    if status is None:
        return {"commit": commit, "dirty": None, "untracked": None}
    lines = [line for line in status.splitlines() if line.strip()]
    untracked = sorted(line[3:] for line in lines if line.startswith("??"))
    return {"commit": commit, "dirty": bool(lines), "untracked": untracked[:_MAX_UNTRACKED]}


def short_commit(git: dict[str, Any] | None) -> str:
    """The first 7 hex digits of a `git_state()` record's commit ("unknown" where there is none),
    as a results page names the code that produced a number."""
    return ((git or {}).get("commit") or "unknown")[:7]


def machine() -> dict[str, Any]:
    """Python, OS and CPU count: what a timing or a numerical result may depend on."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def jax_devices() -> dict[str, Any]:
    """The JAX backend, device kind and counts (starts JAX's backend if nothing has yet)."""
    import jax  # pylint: disable=import-outside-toplevel

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
    }


@functools.lru_cache(maxsize=None)
def _static_record() -> str:
    # Versions, commit and machine do not change within a process; the git calls cost ~10 ms.
    return json.dumps({"versions": package_versions(), "git": git_state(), "machine": machine(),
                       "argv": sys.argv})


def collect(*, devices: bool = True) -> dict[str, Any]:
    """The provenance record: {"versions", "git", "machine", "argv"[, "devices"]}.

    `devices=False` leaves JAX alone (for TensorFlow-only work such as the input benchmark).
    """
    record = json.loads(_static_record())
    if devices:
        record["devices"] = jax_devices()
    return record


def write(workdir: str | os.PathLike[str], *, devices: bool = True) -> str:
    """Writes `collect()` to `<workdir>/provenance.json` and returns that path.

    The workdir may be a local path or an object-store URL (`gs://...`): it is written through
    the same path abstraction as the rest of the workdir.
    """
    from nfnets_jax.runtime import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

    path = workdir_lib.as_path(workdir) / PROVENANCE_FILE
    workdir_lib.write_text_atomically(path, json.dumps(collect(devices=devices), indent=2) + "\n")
    return str(path)
