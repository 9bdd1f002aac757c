"""Test-wide setup: four fake CPU devices, so pmap/shard_map tests run anywhere.

XLA reads XLA_FLAGS once, when the backend starts, so this must happen before any test
module imports jax. Tests that need fewer devices take a prefix of `jax.devices()`.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=4"
if _DEVICE_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow is used for input pipelines only; keep it quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# No persistent compilation cache in tmp workdirs (tests/test_compile_cache.py turns it on itself).
os.environ.setdefault("NFNETS_COMPILE_CACHE", "off")

# Subprocess tests (demo, SIGTERM, multi-host) start fresh interpreters: let them import this
# checkout's packages whether or not it was pip-installed, and whatever their working directory.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
