"""Test-wide setup: four fake CPU devices, so pmap/shard_map tests run anywhere.

XLA reads XLA_FLAGS once, when the backend starts, so this must happen before any test
module imports jax. Tests that need fewer devices take a prefix of `jax.devices()`.
"""

import atexit
import functools
import os
import shutil
import tempfile

import pytest

import xla_test_flags  # pylint: disable=wrong-import-position  # tests/ is on sys.path (rootdir conftest)

_DEVICE_FLAG = "--xla_force_host_platform_device_count=4"
if _DEVICE_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_FLAG).strip()
# Compile fast, run a little slower: see tests/xla_test_flags.py.
if xla_test_flags.FAST_COMPILE.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + xla_test_flags.FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow is used for input pipelines only; keep it quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# No persistent compilation cache in tmp workdirs (tests/test_compile_cache.py turns it on itself).
os.environ.setdefault("NFNETS_COMPILE_CACHE", "off")

# One empty compilation cache per session for every process a test starts (see
# tests/xla_test_flags.py): made by the first process (pytest itself, before xdist starts its
# workers, which inherit the variable) and removed when it exits. JAX reads
# JAX_COMPILATION_CACHE_DIR when it is imported, so it is set after this process imported jax:
# the pytest processes themselves compile without it; the programs tests start read it.
if xla_test_flags.SESSION_CACHE_VARIABLE not in os.environ:
    os.environ[xla_test_flags.SESSION_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="nfnets-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ[xla_test_flags.SESSION_CACHE_VARIABLE], ignore_errors=True)
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # an xdist worker inherits it from pytest
import jax  # noqa: E402  pylint: disable=wrong-import-position,unused-import

os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[xla_test_flags.SESSION_CACHE_VARIABLE]

# Subprocess tests (demo, SIGTERM, multi-host) start fresh interpreters: let them import this
# checkout's packages whether or not it was pip-installed, and whatever their working directory.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)


def _contains_jax_array(value) -> bool:
    """Whether `value` is, or directly holds, a jax.Array (checked by type, without importing jax)."""
    if type(value).__module__.split(".")[0] in ("jax", "jaxlib"):
        return True
    if isinstance(value, dict):
        return any(_contains_jax_array(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_jax_array(v) for v in value)
    return False


def _checked_approx(approx):
    """pytest.approx that refuses a jax.Array as the expected value.

    Whether approx accepts one depends on the pytest release (9.2 calls numpy's `.flat` on it,
    which jax arrays lack), so a test that passes one works or fails by version. Refusing it in
    every version keeps the suite's result independent of which pytest pip resolved.
    """

    @functools.wraps(approx)
    def checked(expected, *args, **kwargs):
        if _contains_jax_array(expected):
            raise TypeError("pytest.approx got a jax.Array as the expected value; compare numbers: "
                            "pass float(x) or np.asarray(x) instead.")
        return approx(expected, *args, **kwargs)

    return checked


pytest.approx = _checked_approx(pytest.approx)


# The few tests that take minutes, longest first (measured on 2 cores: `--durations`).
_LONGEST_MODULES = ("test_reproduce.py", "test_notebooks.py", "test_multihost_digits.py", "test_packaging.py")


def pytest_collection_modifyitems(items):
    """Runs the longest tests first, then the other slow ones, then the rest.

    pytest-xdist hands tests to its workers in this order; started last, the few multi-minute
    tests kept one worker busy long after the other had finished everything else.
    """
    def rank(item):
        module = os.path.basename(str(item.fspath))
        longest = _LONGEST_MODULES.index(module) if module in _LONGEST_MODULES else len(_LONGEST_MODULES)
        return longest, item.get_closest_marker("slow") is None

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _logging_set_up_by_programs_is_undone():
    """Tests that run a program's `main()` in-process leave its logging set up for a program
    (runtime/program_output.for_program: library loggers at CRITICAL, this package's logger with
    its own handler and not propagating), which would hide a later test's records from `caplog`
    in the same worker. Each test starts from the logging state it found."""
    import logging  # pylint: disable=import-outside-toplevel

    from nfnets_jax.runtime import program_output  # pylint: disable=import-outside-toplevel

    loggers = [logging.getLogger(name) for name in ("nfnets_jax", *program_output.LIBRARY_LOGGERS)]
    saved = [(logger.level, logger.propagate, list(logger.handlers), logger.disabled) for logger in loggers]
    yield
    for logger, (level, propagate, handlers, disabled) in zip(loggers, saved):
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers
        logger.disabled = disabled
