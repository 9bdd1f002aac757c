"""JAX's persistent compilation cache for the runner: compile a train step once, not on every resume.

An NFNet-F0 train step takes tens of seconds to compile on a CPU (minutes for the larger variants)
and a preempted run pays that again on every restart. With the cache on, the compiled executable
is written to disk the first time and read back by any later process that compiles the same
program with the same JAX version and backend (`python -m benchmarks.compare_timm` reports the
cold and the cached compile time).

Where it lives, in order of precedence:
- `NFNETS_COMPILE_CACHE=off` (or `0`, `none`, empty) turns it off;
- `NFNETS_COMPILE_CACHE=/some/dir` (any path JAX accepts, e.g. a shared `gs://` bucket) puts every
  run's cache there, so that different workdirs share it;
- otherwise `<workdir>/compile_cache`, so a resumed run finds what its first start compiled.
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "NFNETS_COMPILE_CACHE"
WORKDIR_SUBDIR = "compile_cache"
_OFF = ("off", "0", "none", "false", "")

# Programs that compile faster than this are not worth a disk round trip (JAX's default is 1 s;
# tiny test models stay out of the cache either way).
MIN_COMPILE_SECONDS = 1.0


def cache_dir_for(workdir: str | os.PathLike | None) -> str | None:
    """The cache directory the environment and `workdir` select, or None when it is off."""
    chosen = os.environ.get(ENV_VAR)
    if chosen is not None:
        return None if chosen.strip().lower() in _OFF else chosen
    if workdir is None:
        return None
    text = os.fspath(workdir)
    if "://" in text and not text.startswith("gs://"):
        return None  # JAX's cache writes local paths and gs:// only (not other object-store URLs)
    return text.rstrip("/") + "/" + WORKDIR_SUBDIR


def enable(cache_dir: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `cache_dir` (None: leaves it off). Returns it.

    Safe to call more than once in one process (tests, notebooks): a new directory replaces the
    previous one instead of being ignored.
    """
    if cache_dir is None:
        return None
    if not cache_dir.startswith("gs://"):
        os.makedirs(cache_dir, exist_ok=True)
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel

    if jax.config.jax_compilation_cache_dir != cache_dir:
        compilation_cache.reset_cache()  # JAX opens its cache once; make it re-read the setting
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return cache_dir


def enable_for_workdir(workdir: str | os.PathLike) -> str | None:
    """The runner's call: the cache `cache_dir_for(workdir)` selects, switched on. Returns its path."""
    return enable(cache_dir_for(workdir))
