"""Orbax checkpoints of the train state: every N steps, keep the last K, on SIGTERM, resume.

What is saved is the one logical copy of `TrainState` (replicated global arrays; orbax writes a
replicated array once, from one process, and coordinates multi-process saves) and a small JSON
record with the step and the position in the data stream. Saves are atomic (orbax writes to a
temporary directory and renames it when complete), so a run killed mid-save resumes from the
previous complete checkpoint; the unfinished save it leaves (`<step>.orbax-checkpoint-tmp-*`) is
never listed as a step and is deleted when the next run opens the directory. A state with
non-finite values is never handed to `save`: the loop checks first, so the last good checkpoint is
never overwritten.

Restoring trusts nothing on disk: each save records a CRC32 of every leaf's bytes in `meta`, and
`restore_latest` walks from the newest step down, skipping (with one warning each) checkpoints
that are unreadable (missing or truncated files, garbled data, missing metadata) or that restore
to the wrong step, shapes, dtypes, non-finite params or bytes that fail their CRC. Skipped ones
are moved to `corrupt_checkpoints/` next to the checkpoint directory, so that the resumed run can
save those steps again. When no checkpoint survives, `CorruptCheckpointError` says what to do;
nothing is loaded and nothing starts from scratch behind the user's back.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nfnets_jax.train.state import TrainState

_log = logging.getLogger(__name__)

# Suffix orbax gives a step directory while it is being written (renamed away on commit).
_UNFINISHED_SAVE_MARKER = ".orbax-checkpoint-tmp"
# What orbax and tensorstore raise for missing, truncated or garbled files: FileNotFoundError for a
# missing `_METADATA` or item file, ValueError for tensorstore's NOT_FOUND / DATA_LOSS /
# OUT_OF_RANGE statuses and for unparsable JSON, KeyError for a metadata tree that lacks an entry.
_UNREADABLE_ERRORS = (OSError, ValueError, KeyError)
# Files every save writes whose absence orbax reports only obliquely (a pytree structure error).
_REQUIRED_FILES = ("state/_METADATA", "meta/metadata")
# Leaf paths (of `TrainState` fields) that the loop guarantees finite before every save: non-finite
# updates are never applied. (The optimizer state is left out: an optax state may hold inf.)
_FINITE_PATH_PREFIXES = (".params[", ".model_state[", ".ema_params[")


class CorruptCheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored and verified; nothing was loaded."""


class _FailedVerification(ValueError):
    """A checkpoint restored without error but does not hold what was saved."""


def _host_leaves(state: TrainState) -> list[tuple[str, np.ndarray]]:
    """(path, host copy) of every leaf, read from this process's first addressable shard."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [(jax.tree_util.keystr(path), np.asarray(leaf.addressable_shards[0].data)
             if isinstance(leaf, jax.Array) else np.asarray(leaf)) for path, leaf in flat]


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def leaf_checksums(state: TrainState) -> dict[str, int]:
    """CRC32 of each leaf's bytes, keyed by its tree path: recorded at save, checked at restore."""
    return {path: _crc32(value) for path, value in _host_leaves(state)}


def _short(error: BaseException) -> str:
    """One line of an exception, without tensorstore's long JSON spec."""
    text = str(error).split("[tensorstore_spec")[0].strip().splitlines()
    text = text[0] if text else ""
    return f"{type(error).__name__}: {text[:300]}"


def _verify(step: int, state: TrainState, meta: dict, abstract_state: TrainState) -> None:
    """Raises `_FailedVerification` unless `state` is exactly what was saved at `step`."""
    if int(meta["step"]) != step:
        raise _FailedVerification(f"its meta record says step {meta['step']}")
    if jax.tree.structure(state) != jax.tree.structure(abstract_state):
        raise _FailedVerification("its tree of arrays differs from the model's train state")
    for (path, leaf), target in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                    jax.tree.leaves(abstract_state)):
        if leaf.shape != target.shape or leaf.dtype != target.dtype:
            raise _FailedVerification(
                f"{jax.tree_util.keystr(path)} is {leaf.dtype}{list(leaf.shape)}, the model expects "
                f"{target.dtype}{list(target.shape)}")
    host = _host_leaves(state)
    saved_step = int(dict(host)[".step"])
    if saved_step != step:
        raise _FailedVerification(f"its state holds step {saved_step}")
    for path, value in host:
        if (path.startswith(_FINITE_PATH_PREFIXES) and np.issubdtype(value.dtype, np.floating)
                and not np.all(np.isfinite(value))):
            raise _FailedVerification(f"{path} holds NaN or inf")
    expected = meta.get("leaf_crc32")
    if expected is None:  # written before checksums were recorded: nothing more to compare
        return
    wrong = [path for path, value in host if expected.get(path) != _crc32(value)]
    if wrong or set(expected) != {path for path, _ in host}:
        raise _FailedVerification(f"CRC32 mismatch in {wrong or 'the set of leaves'}")


class Checkpointer:
    """Saves and restores `TrainState` under `workdir/checkpoints` with orbax.

    Args:
      directory: where the step directories go.
      every_steps: periodic save interval (the final step and SIGTERM always save).
      keep: how many of the most recent checkpoints to keep.

    Opening the directory deletes unfinished saves left by a killed run (see module docstring).
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int):
        if every_steps <= 0 or keep <= 0:
            raise ValueError(
                f"config.checkpoint.every_steps={every_steps} and config.checkpoint.keep={keep} "
                "must both be positive."
            )
        self.every_steps = every_steps
        directory = os.path.abspath(directory)
        unfinished = sorted(name for name in (os.listdir(directory) if os.path.isdir(directory) else ())
                            if _UNFINISHED_SAVE_MARKER in name)
        if unfinished and jax.process_index() == 0:
            _log.warning("Deleting unfinished checkpoint save(s) %s in %s, left by an interrupted run.",
                         ", ".join(unfinished), directory)
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True),
            item_names=("state", "meta"),
        )

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, *, data_position: int) -> None:
        """Saves `state` at `step` (every process must call this; orbax coordinates)."""
        meta = {"step": int(step), "data_position": int(data_position),
                "leaf_crc32": leaf_checksums(state)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
        """Restores the newest checkpoint that reads back intact, or None when there is none.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` carrying the replicated sharding,
        so restored arrays land directly on every device (re-replicated) with the right dtypes.
        Newer checkpoints that fail to restore or to verify (see module docstring) are skipped
        with one warning each and moved to `corrupt_checkpoints/`.

        Raises:
          CorruptCheckpointError: checkpoints exist but none of them is intact.
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                missing = [name for name in _REQUIRED_FILES
                           if not os.path.exists(os.path.join(self._step_path(step), name))]
                if missing:
                    raise _FailedVerification(f"{', '.join(missing)} missing")
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                state, meta = restored["state"], dict(restored["meta"])
                _verify(step, state, meta, abstract_state)
            except _UNREADABLE_ERRORS as error:
                reason = error if isinstance(error, _FailedVerification) else _short(error)
                _log.warning("Checkpoint %s is unreadable or corrupt (%s); skipping it (it goes to "
                             "corrupt_checkpoints/ once an older one restores).",
                             self._step_path(step), reason)
                failures.append((step, str(reason)))
                continue
            self._set_aside([failed for failed, _ in failures])
            if jax.process_count() > 1:
                multihost_utils.assert_equal(np.int64(step), "processes restored different steps")
            return state, meta
        if failures:
            listing = "; ".join(f"step {failed}: {reason}" for failed, reason in failures)
            raise CorruptCheckpointError(
                f"No checkpoint in {self.directory} could be restored intact ({listing}). Nothing was "
                f"loaded. To start this run from scratch, move the checkpoints aside (e.g. `mv "
                f"{self.directory} {self.directory}.corrupt`) or use a new workdir; to recover, restore "
                "a copy of the checkpoint directory from backup.")
        return None

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _set_aside(self, steps: list[int]) -> None:
        """Moves failed step directories out of orbax's sight (kept for inspection)."""
        if not steps:
            return
        if jax.process_index() == 0:
            corrupt_dir = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
            os.makedirs(corrupt_dir, exist_ok=True)
            for step in steps:
                destination = os.path.join(corrupt_dir, str(step))
                if os.path.exists(destination):
                    destination += f".{time.time_ns()}"
                shutil.move(self._step_path(step), destination)
                _log.info("Moved corrupt checkpoint %s to %s.", self._step_path(step), destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("nfnets_jax_checkpoints_set_aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until any in-flight save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionWatcher:
    """Turns SIGTERM into a request to save and exit cleanly at the next step boundary.

    Single process: a Python signal handler only sets a flag (nothing unsafe runs inside the
    handler). Several processes must agree on the step at which they save (the save is
    collective), so there the decision goes through JAX's preemption sync point: the coordination
    service started by `jax.distributed.initialize` catches SIGTERM on any process and every
    process reaches the same sync step (no Python handler is installed then, so as not to replace
    the service's own).
    """

    def __init__(self):
        self._requested = threading.Event()
        self._previous = None
        self._multi_process = jax.process_count() > 1

    def __enter__(self) -> "PreemptionWatcher":
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        """True once a SIGTERM has arrived (on any process, for multi-process runs)."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()
