"""A run's output is ours: what the libraries under it print unasked is held back.

Two kinds of noise reach a user who did not ask for it:

- C++ start-up notices that TensorFlow (the input pipeline's library) writes straight to file
  descriptor 2 while it is imported — absl's "All log messages before absl::InitializeLog() is
  called are written to STDERR" preamble, oneDNN's and the CPU-feature guard's notices — twice per
  process, whatever `TF_CPP_MIN_LOG_LEVEL` says. `import_tensorflow` imports TensorFlow and TFDS
  with descriptor 2 captured and writes back every line that is not one of those notices, so an
  error during the import still reaches the user.
- Python logging of the libraries a run drives (orbax, absl, TensorStore, asyncio), whose
  INFO/WARNING lines describe their internals ("Item 'meta' was found in the checkpoint, but
  could not be restored", per-save progress). `quiet_library_loggers` raises those loggers to
  ERROR; what the user must know, the runner says itself, in its own words.

`for_program` sets both up at a program's start, and gives this package's own warnings (a
skipped checkpoint, a failed save) one plain line each: `warning: <message>`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

# Lines TensorFlow's C++ start-up writes to descriptor 2 that carry nothing for the user.
_STARTUP_NOTICES = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(r"^[IW]\d{4} [\d:.]+\s+\d+ (port|cpu_feature_guard|cuda_\w+|gpu_\w+)\.cc:\d+\] "),
    re.compile(r"^To enable the following instructions: .* in other operations, rebuild TensorFlow"),
)
# Loggers of the libraries the runner drives, held at ERROR.
LIBRARY_LOGGERS = ("absl", "orbax", "tensorstore", "asyncio", "tensorflow", "jax", "etils")


@contextlib.contextmanager
def descriptor_2_filtered(noise: tuple[re.Pattern, ...] = _STARTUP_NOTICES) -> Iterator[None]:
    """Captures what anything in this process writes to file descriptor 2 (C++ included) while
    the block runs, then writes back every line that matches none of `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not any(pattern.search(line) for pattern in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow() -> Any:
    """`tensorflow`, imported (with `tensorflow_datasets`) without its C++ start-up notices.

    Call it before the first `import tensorflow` of a process; later calls return the module.
    """
    if "tensorflow" in sys.modules and "tensorflow_datasets" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own INFO and WARNING lines
    with descriptor_2_filtered():
        import tensorflow  # pylint: disable=import-outside-toplevel
        import tensorflow_datasets  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return tensorflow


def quiet_library_loggers(level: int = logging.ERROR) -> None:
    """Raises the driven libraries' Python loggers (`LIBRARY_LOGGERS`) to `level`, and the root
    logger to WARNING (absl's handler would otherwise print every library's INFO lines)."""
    logging.getLogger().setLevel(logging.WARNING)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)


class _OwnWarnings(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def for_program() -> None:
    """At a program's start: library loggers quiet (their errors too: a failed save or restore
    is reported by the runner, in one line, not by orbax's traceback per array), JAX's warning
    that its compilation cache could not be written (the cache is an optimisation; the failure
    that matters is reported where it matters) held back, and this package's warnings as one
    plain line each on stderr (not absl's `W1205 10:00:00.123 file.py:42]` prefix)."""
    quiet_library_loggers(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
    warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
    own = logging.getLogger("nfnets_jax")
    if not any(isinstance(handler.formatter, _OwnWarnings) for handler in own.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OwnWarnings())
        own.addHandler(handler)
    own.setLevel(logging.WARNING)
    own.propagate = False
