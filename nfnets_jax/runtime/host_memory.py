"""Keeps freed host memory inside the process, so that XLA:CPU stops page-faulting its scratch space.

Why: XLA:CPU allocates the temporaries of a compiled program with `malloc` on every execution and
frees them afterwards. On glibc a block that large (1.2 GB for NFNet-F0's train step at batch 8,
192 px) is a fresh `mmap` each time and goes back to the kernel with `munmap`, so every step the
kernel zero-fills ~300,000 pages again: 15–18% of the step's CPU time is spent in the kernel
(`python -m benchmarks.compare_timm` reports the page faults per step). Allocators built for
servers (tcmalloc, jemalloc) keep such blocks; glibc can be told to, with three settings:

- one arena (`M_ARENA_MAX=1`): a thread's own arena cannot grow past 64 MB and glibc then maps
  large blocks whatever the other settings say; the main arena grows with `brk` instead;
- no `mmap` for large blocks (`M_MMAP_MAX=0`);
- never trim the heap's free top back to the kernel (`M_TRIM_THRESHOLD` = the largest size).

The cost: the process keeps its peak heap until it exits, and all threads share one malloc arena.
The heap also settles only after a few executions more than one: small allocations made between two
executions split a freed temporary, and the next execution then no longer fits in it and extends the
heap by another copy (a 64 MB temporary on this project's CI box: 6 such growths in 120 executions,
then none; `tests/test_host_memory.py` counts faults only once the peak memory has settled).
That suits a process whose computation runs on the CPU (CPU training and eval, the benchmarks), and
not a TPU/GPU host whose many input-pipeline threads would contend for that one arena; so
`auto` applies it only when JAX will run on the CPU. `NFNETS_HOST_MALLOC=keep` or `=default`
forces either choice. It must run before JAX creates its thread pools (threads keep the arena
they first allocated from): call it before the first device is touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import sys

ENV_VAR = "NFNETS_HOST_MALLOC"
CHOICES = ("auto", "keep", "default")

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Packages whose presence means JAX's default backend will be an accelerator.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
# libtpu is also installed where nothing runs on a TPU (`experiments.memory_plan --target tpu-v3`
# compiles with it on any host); JAX then starts its TPU backend only if a TPU chip is on the PCI
# bus (Google's vendor id; jax/_src/hardware_utils.py), and so does this rule.
_TPU_PLUGIN = "libtpu"
_GOOGLE_PCI_VENDOR_ID = "0x1ae0"
_PCI_VENDOR_FILES = "/sys/bus/pci/devices/*/vendor"

# The same three settings as glibc tunables, for a process started with them in its environment.
GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  "glibc.malloc.trim_threshold=18446744073709551615")

_applied = False


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or broken
        return False


def tpu_chip_present() -> bool:
    """Whether a Google PCI device (a TPU chip) is attached to this host."""
    for path in glob.glob(_PCI_VENDOR_FILES):
        try:
            with open(path, encoding="ascii") as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR_ID:
                    return True
        except OSError:
            continue
    return False


def jax_will_use_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting JAX: `JAX_PLATFORMS`
    if set, else whether a GPU plugin (CUDA, ROCm) is installed, or libtpu with a TPU chip attached."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    if any(_installed(name) for name in _ACCELERATOR_PLUGINS):
        return False
    return not (_installed(_TPU_PLUGIN) and tpu_chip_present())


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # musl has no such symbol
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(choice: str | None = None) -> bool:
    """Applies the settings of the module doc when `choice` (default: `$NFNETS_HOST_MALLOC`, else
    `auto`) asks for them and the C library is glibc; returns whether they are in force."""
    global _applied  # pylint: disable=global-statement
    choice = (choice or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: choose one of {', '.join(CHOICES)}.")
    if _applied:
        return True
    if choice == "default" or (choice == "auto" and not jax_will_use_cpu()):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # -1 converts to SIZE_MAX inside glibc: the heap top is never trimmed.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _applied
