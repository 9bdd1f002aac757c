"""The run's checkpoints: save every N steps, keep the last K, find, verify and restore them.

The one place that finds and verifies checkpoints, for every reader: resume (`Checkpointer`),
evaluation and fine-tuning from a workdir (`read_workdir_state`, `read_params`), and the check at
the door that a workdir was written by the model about to resume it (`check_resumable`). Weight
files (DeepMind's, timm's, our `.npz`) are read by `nfnets_jax.weights`; `read_params` takes
either.

What is saved is the one logical copy of `TrainState` (replicated global arrays; orbax writes a
replicated array once, from one process, and coordinates multi-process saves) and a small JSON
record: the step, the position in the data stream (the step: the stream is a function of it),
the integrity format and a fingerprint of every leaf. Saves are asynchronous (orbax copies the
arrays to host, returns, and writes in a background thread) and atomic (orbax writes to a
temporary directory and commits it when complete), so a run killed mid-save resumes from the
previous complete checkpoint; the unfinished save it leaves (`<step>.orbax-checkpoint-tmp-*`) is
never listed as a step and is deleted when the next run opens the directory (which it only does
while holding the workdir lock, see `nfnets_jax.runtime.workdir_lock`). A state with non-finite
values is never handed to `save`: the loop checks first, so the last good checkpoint is never
overwritten.

The fingerprint (`fingerprint`) of every leaf is computed on the devices that hold it, by one
jitted function (one pass over the state at the device's memory bandwidth); only the uint32 per
leaf comes to host, into the record. A save never copies the state to host for its integrity data.

Restoring trusts nothing on disk. Every field of the record is checked against something
independent of it (the step against the folder's name and the state's own step counter, the data
position against the step, the fingerprints against the restored arrays, the format against the
one this version writes; a record with any other field fails), so no value inside a checkpoint
can change what a resume does, or switch verification off, unnoticed. `restore_latest` (resume)
and `read_latest` walk from the newest step down and skip, with one warning each, checkpoints that
fail to restore in any way (orbax and TensorStore raise anything from `ValueError` to a bare
`Exception` for missing, truncated, emptied or garbled files) or to verify, and step entries that
are not readable folders at all (a file, a symlink, a folder without permissions). While a
checkpoint is tried, orbax's, TensorStore's and asyncio's own logging is held back, so a damaged
checkpoint costs the user one line, not pages of tracebacks. On resume, skipped checkpoints are
moved out of orbax's sight (to `corrupt_checkpoints/`, or renamed in place when they cannot be
moved), so that the resumed run can save those steps again; readers leave them where they are.
When no checkpoint survives, `CorruptCheckpointError` says what to do; nothing is loaded and
nothing starts from scratch behind the user's back. A checkpoint whose arrays do not match the
model being resumed (a changed config) raises `IncompatibleCheckpointError` naming the
differences, before anything is moved.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from nfnets_jax import weights
from nfnets_jax.runtime import workdir as workdir_lib
from nfnets_jax.train.state import TrainState

_log = logging.getLogger(__name__)

# Suffix orbax gives a step directory while it is being written (renamed away on commit).
_UNFINISHED_SAVE_MARKER = ".orbax-checkpoint-tmp"
# Files every save writes whose absence orbax reports only obliquely (a pytree structure error).
_REQUIRED_FILES = ("state/_METADATA", "meta/metadata")
# Top-level `TrainState` fields that the loop guarantees finite before every save: non-finite
# updates are never applied. (The optimizer state is left out: an optax state may hold inf.)
_FINITE_FIELDS = ("params", "model_state", "ema_params")
# `meta["integrity"]` of checkpoints whose `meta["fingerprints"]` maps leaf names to `fingerprint`s:
# the only format verified. (Two earlier ones, fingerprints as an orbax item and CRC32s computed on
# the host, were last written before release 0.1.0 and are refused like damage.)
FINGERPRINT_FORMAT = "uint32-weighted-sum-v2"
# The fields of a checkpoint's JSON record, every one of them verified.
_RECORD_FIELDS = frozenset({"step", "data_position", "integrity", "fingerprints"})
# A workdir's folder of step directories.
CHECKPOINTS_FOLDER = "checkpoints"
# The sub-folder a checkpoint directory's damaged steps are moved to, next to it.
CORRUPT_FOLDER = "corrupt_checkpoints"
# Suffix of a damaged step renamed in place when it cannot be moved (orbax lists digits only).
_SET_ASIDE_SUFFIX = ".unreadable-"
# Loggers whose output during a failed restore attempt is noise to the user (orbax logs through
# absl; asyncio reports the tasks orbax leaves behind when a read fails).
_NOISY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore", "jax._src.distributed")
_MAX_LISTED_DIFFERENCES = 4


class CorruptCheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored and verified; nothing was loaded."""


class IncompatibleCheckpointError(ValueError):
    """The newest checkpoint holds arrays of another model (names or shapes differ)."""


class CheckpointDirectoryError(RuntimeError):
    """The checkpoint folder cannot be used as it is (what to do is in the message)."""


class CheckpointSaveError(RuntimeError):
    """A save could not be written (full disk, quota, file-size limit, permissions); the message
    says which step, where, why, and which checkpoint is still the newest complete one."""


# What a failed write's OS error means for the user, by errno.
_WRITE_FAILURE_HINTS = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file-size limit (ulimit -f) is reached", errno.EACCES: "permission denied",
    errno.EPERM: "permission denied", errno.EROFS: "the filesystem is read-only",
}


def _os_error_code(error: BaseException) -> int | None:
    """The errno behind a failed write, from the exception chain or TensorStore's message."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        found = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(error))
        if found:
            return int(found.group(1) or found.group(2))
        error = error.__cause__ or error.__context__
    return None


class _FailedVerification(ValueError):
    """A checkpoint restored without error but does not hold what was saved."""


# ---- Fingerprints: computed on device, at save and at restore --------------------------------------

def _words(leaf: jax.Array) -> jax.Array:
    """The leaf's bytes as a flat uint32 vector (narrower types widened, wider ones split)."""
    flat = leaf.reshape(-1)
    if flat.dtype == jnp.bool_:
        flat = flat.astype(jnp.uint8)
    size = flat.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(flat, jnp.uint32)
    if size in (1, 2):
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(flat, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(flat, jnp.uint32).reshape(-1)  # 8 bytes -> 2 words


def _leaf_fingerprint(leaf: jax.Array) -> jax.Array:
    """A position-weighted sum (mod 2**32) of the leaf's words: a uint32 scalar.

    Each word goes through an invertible xorshift and is multiplied by an odd weight that depends
    on its position, so changing any single word always changes the sum (and swapping words
    changes it too, but for a 2**-32 chance); modular addition makes the result independent of
    how XLA orders the reduction and of the sharding. One pass over the bytes, at the memory
    bandwidth of the device that holds them.
    """
    words = _words(leaf)
    words = words ^ (words >> 16)
    position_weights = jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.sum(words * position_weights, dtype=jnp.uint32)


@jax.jit
def fingerprint(state: Any) -> Any:
    """A uint32 fingerprint of every leaf of `state`, same tree structure, on device."""
    return jax.tree.map(_leaf_fingerprint, state)


def host_fingerprints(state: Any) -> dict[str, int]:
    """{leaf name: fingerprint} of `state`, computed on device in one program (what a save records)."""
    return {name: int(_host(value)) for name, value in _named_leaves(fingerprint(state)).items()}


@jax.jit
def _restored_summary(state: Any) -> tuple[Any, Any]:
    """(fingerprints, all-finite flag per floating leaf): what verification needs, on device."""
    finite = jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating)
                          else jnp.bool_(True), state)
    return fingerprint(state), finite


def _key_name(key: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _path_name(path: tuple) -> str:
    """`opt_state/0/trace/net/~/linear/w`: the same for a `TrainState` and orbax's dict of it."""
    return "/".join(_key_name(key) for key in path)


def _named_leaves(tree: Any) -> dict[str, Any]:
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _host(leaf: Any) -> np.ndarray:
    return np.asarray(leaf.addressable_shards[0].data) if isinstance(leaf, jax.Array) else np.asarray(leaf)


# ---- Verification --------------------------------------------------------------------------------

def _short(error: BaseException) -> str:
    """One line of an exception, without tensorstore's long JSON spec."""
    text = str(error).split("[tensorstore_spec")[0].strip().splitlines()
    text = text[0] if text else ""
    return f"{type(error).__name__}: {text[:300]}"


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Leaf names, shapes and dtypes that differ between a checkpoint and the train state."""
    return weights.differences(found, expected, found_as="checkpoint", compare_dtypes=True)


def _verify(step: int, state: Any, meta: Any, abstract_state: Any) -> None:
    """Raises `_FailedVerification` unless `state` and its record `meta` are exactly what was saved
    at `step`: every field of the record is checked against something independent of it."""
    if not isinstance(meta, dict) or set(meta) != _RECORD_FIELDS:
        fields = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise _FailedVerification(f"its record holds {fields}, not the fields {sorted(_RECORD_FIELDS)}")
    if meta["integrity"] != FINGERPRINT_FORMAT:
        raise _FailedVerification(f"its record names the integrity format {meta['integrity']!r}, not "
                                  f"{FINGERPRINT_FORMAT!r} (the one this version verifies)")
    if not _is_int(meta["step"]) or meta["step"] != step:
        raise _FailedVerification(f"its record says step {meta['step']!r}")
    if not _is_int(meta["data_position"]) or meta["data_position"] != step:
        raise _FailedVerification(f"its record puts the data stream at {meta['data_position']!r}, not at "
                                  f"its step {step}")
    wrong = _differences(_named_leaves(state), _named_leaves(abstract_state))
    if wrong:
        raise _FailedVerification(f"its arrays differ from the train state: {wrong[0]}")
    saved_step = int(_host(_named_leaves(state)["step"]))
    if saved_step != step:
        raise _FailedVerification(f"its state holds step {saved_step}")
    fingerprints, finite = jax.device_get(_restored_summary(state))
    flat, _ = jax.tree_util.tree_flatten_with_path(finite)
    for path, ok in flat:
        if _key_name(path[0]) in _FINITE_FIELDS and not bool(ok):
            raise _FailedVerification(f"{_path_name(path)} holds NaN or inf")
    saved = meta["fingerprints"]
    if not isinstance(saved, dict):
        raise _FailedVerification("its fingerprints are missing")
    computed = {name: int(np.asarray(value)) for name, value in _named_leaves(fingerprints).items()}
    if set(saved) != set(computed):
        raise _FailedVerification("its fingerprints cover other arrays than its state")
    mismatched = [name for name in computed if not _same_fingerprint(saved[name], computed[name])]
    if mismatched:
        raise _FailedVerification(f"fingerprint mismatch in {mismatched[:3]}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same_fingerprint(saved: Any, computed: int) -> bool:
    """`saved` (a JSON value) records `computed`; False for anything else a damaged record may hold
    (a string, a float, null, a list)."""
    return _is_int(saved) and saved == computed


def _is_late_report_into_a_closed_loop(unraisable: Any) -> bool:
    """True for the report a failed orbax read leaves behind after it returned: TensorStore
    finishing a read whose asyncio loop orbax has already closed, which TensorStore's callback
    thread reports as "Event loop is closed" from `call_soon_threadsafe`, seconds later."""
    error = unraisable.exc_value
    if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
        return False
    frames = [frame.name for frame in traceback.extract_tb(unraisable.exc_traceback)]
    return "call_soon_threadsafe" in frames


def _is_abandoned_orbax_coroutine(unraisable: Any) -> bool:
    """True for the report of a coroutine of orbax or TensorStore that a failed read or write left
    unfinished, when it is garbage-collected (later in the run, or at the interpreter's exit,
    one report per array: hundreds of "Exception ignored in: <coroutine ...>" tracebacks)."""
    code = getattr(unraisable.object, "cr_code", None)
    filename = getattr(code, "co_filename", "") or ""
    return any(f"{os.sep}{package}{os.sep}" in filename for package in ("orbax", "tensorstore"))


def _drop_late_reports_of_failed_io() -> None:
    """Installs, once per process, a `sys.unraisablehook` that drops only the reports
    `_is_late_report_into_a_closed_loop` and `_is_abandoned_orbax_coroutine` describe and passes
    everything else on.

    They arrive after the read or write that caused them has ended and carry nothing to act on:
    the failure itself was already reported, as one line. Anything else unraisable still reaches
    the hook that was there before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_nfnets_drops_failed_io_reports", False):
        return

    def hook(unraisable: Any) -> None:
        if not (_is_late_report_into_a_closed_loop(unraisable) or _is_abandoned_orbax_coroutine(unraisable)):
            previous(unraisable)

    hook._nfnets_drops_failed_io_reports = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_restore_attempt() -> Iterator[None]:
    """Holds back what orbax, TensorStore and asyncio print while one checkpoint is tried:
    their loggers, and the exceptions that orbax's abandoned asyncio tasks and threads raise
    when a read fails (reported through `sys.unraisablehook` and `threading.excepthook`), also
    those that arrive after the attempt (`_drop_late_reports_of_failed_io`)."""
    _drop_late_reports_of_failed_io()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    hooks = sys.unraisablehook, threading.excepthook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        sys.unraisablehook, threading.excepthook = hooks


def _step_reader() -> ocp.Checkpointer:
    """Reads one step directory (both items), without a manager: orbax's `CheckpointManager` reads
    the metadata of every step when it opens a directory and fails on any it cannot read, so
    readers go step by step, and only the writer opens a manager (once the leftovers are aside)."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(state=ocp.StandardCheckpointHandler(),
                                                           meta=ocp.JsonCheckpointHandler()))


def _metadata_tree(step_path: epath.Path) -> Any:
    """The saved state's tree of array metadata (names, shapes, dtypes), no array read."""
    reader = _step_reader()
    try:
        metadata = reader.metadata(workdir_lib.checkpoint_location(step_path)).item_metadata["state"]
    finally:
        reader.close()
    return getattr(metadata, "tree", metadata)


def _on_one_device(tree: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree)


def _restore_one(step_path: epath.Path, step: int, abstract_state: Any | None) -> tuple[Any, dict]:
    """Restores and verifies one step; raises on any failure. `abstract_state=None` restores
    whatever tree the checkpoint holds, onto this process's first device."""
    missing = [name for name in _REQUIRED_FILES if not (step_path / name).exists()]
    if missing:
        raise _FailedVerification(f"{', '.join(missing)} missing")
    if abstract_state is None:
        abstract_state = _on_one_device(_metadata_tree(step_path))
    reader = _step_reader()
    try:
        restored = reader.restore(workdir_lib.checkpoint_location(step_path), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    finally:
        reader.close()
    state, meta = restored["state"], restored["meta"]
    _verify(step, state, meta, abstract_state)
    return state, dict(meta)


def _incompatibility(step_path: epath.Path, abstract_state: Any) -> list[str]:
    """How the arrays the step's (readable) metadata describes differ from `abstract_state`;
    [] when they match or the metadata cannot be read (damage is the restore's business)."""
    try:
        with _quiet_restore_attempt():
            saved = _named_leaves(_metadata_tree(step_path))
    except Exception:  # pylint: disable=broad-except
        return []
    return _differences(saved, _named_leaves(abstract_state)) if saved else []


def _raise_if_incompatible(directory: epath.Path, step: int, abstract_state: Any) -> None:
    """Raises `IncompatibleCheckpointError` if step `step` holds another model's arrays."""
    differences = _incompatibility(directory / str(step), abstract_state)
    if not differences:
        return
    # Params of another shape say most about what changed; the optimizer's copies of them, and
    # missing and extra arrays, follow.
    differences.sort(key=lambda line: (not line.startswith(("wrong shape", "wrong dtype")),
                                       " params/" not in line))
    listed = "\n  ".join(differences[:_MAX_LISTED_DIFFERENCES])
    more = len(differences) - _MAX_LISTED_DIFFERENCES
    raise IncompatibleCheckpointError(
        f"The checkpoint of step {step} in {directory} was written by another model or optimizer "
        f"({len(differences)} of its arrays differ):\n  {listed}"
        f"{f'{chr(10)}  ... and {more} more' if more > 0 else ''}\n"
        "Nothing was changed. To continue that run, use its config (the workdir's config.json); to "
        "train this model, pass a new --workdir.")


def _is_step_name(name: str) -> bool:
    return name.isdigit()


def _step_entries(directory: epath.Path) -> tuple[list[int], list[str]]:
    """(steps, newest first; names of unusable step entries) of a checkpoint directory.

    An entry named like a step (digits) is unusable when it is not a folder orbax can read: a
    file, a symlink (to anything, a loop included), a folder without read and search permission.
    Orbax would pass over some of them and fail on others when opening the directory, and the
    next save of that step would fail on the leftover; they are set aside like any damaged
    checkpoint. Unfinished saves (`<step>.orbax-checkpoint-tmp-*`) are not steps.
    """
    if workdir_lib.is_url(directory):  # object stores: no symlinks or permission bits
        try:
            names = [child.name for child in directory.iterdir() if _is_step_name(child.name)]
        except OSError:
            return [], []
        return sorted((int(name) for name in names), reverse=True), []
    try:
        entries = [entry for entry in os.scandir(directory) if _is_step_name(entry.name)]
    except OSError:
        return [], []
    usable, unusable = [], []
    for entry in entries:
        try:
            ok = (not entry.is_symlink() and entry.is_dir(follow_symlinks=False)
                  and os.access(entry.path, os.R_OK | os.X_OK))
        except OSError:
            ok = False
        (usable if ok else unusable).append(entry.name)
    return sorted((int(name) for name in usable), reverse=True), sorted(unusable, key=int, reverse=True)


def _restore_newest_intact(directory: epath.Path, abstract_state: Any | None
                           ) -> tuple[Any, dict, list[str]] | None:
    """(state, meta, names of the step entries skipped) of the newest step that restores intact,
    or None when the directory holds no step; warns once per skipped entry; raises
    `CorruptCheckpointError` when steps exist and none is intact."""
    steps, unusable = _step_entries(directory)
    for name in unusable:
        _log.warning("Checkpoint %s is not a readable folder (a file, a symlink or without "
                     "permissions); skipping it.", directory / name)
    if steps and abstract_state is not None:
        _raise_if_incompatible(directory, steps[0], abstract_state)
    failures: list[tuple[str, str]] = [(name, "not a readable folder") for name in unusable]
    for step in steps:
        try:
            with _quiet_restore_attempt():
                state, meta = _restore_one(directory / str(step), step, abstract_state)
        except Exception as error:  # pylint: disable=broad-except  # any failure: try the next one
            reason = error if isinstance(error, _FailedVerification) else _short(error)
            _log.warning("Checkpoint %s is unreadable or corrupt (%s); skipping it.",
                         directory / str(step), reason)
            failures.append((str(step), str(reason)))
            continue
        return state, meta, [name for name, _ in failures]
    if failures:
        listing = "; ".join(f"step {name}: {reason}" for name, reason in failures)
        raise CorruptCheckpointError(
            f"No checkpoint in {directory} could be restored intact ({listing}). Nothing was "
            f"loaded. To start this run from scratch, move the checkpoints aside (e.g. `mv "
            f"{directory} {directory}.corrupt`) or use a new workdir; to recover, restore "
            "a copy of the checkpoint directory from backup.")
    return None


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def read_latest(directory: str | epath.Path) -> tuple[dict, dict] | None:
    """(state as a dict of arrays on this process's first device, meta) of the newest intact
    checkpoint in `directory`, verified as on resume; None if it holds no checkpoint.

    Read-only: skipped checkpoints stay where they are (a run may be writing this directory).

    Raises:
      CorruptCheckpointError: checkpoints exist but none of them is intact.
    """
    found = _restore_newest_intact(workdir_lib.as_path(directory), None)
    return None if found is None else found[:2]


# ---- Finding a workdir's checkpoints: resume checks, evaluation, fine-tuning -------------------------

def find_checkpoint_directory(path: str | os.PathLike) -> epath.Path | None:
    """The folder of step directories of a workdir (`path/checkpoints`), or `path` itself when
    it is such a folder; None when neither holds a step."""
    root = workdir_lib.as_path(path)
    for candidate in (root / CHECKPOINTS_FOLDER, root):
        try:
            if candidate.is_dir() and any(_is_step_name(child.name) for child in candidate.iterdir()):
                return candidate
        except OSError:
            continue
    return None


def check_resumable(workdir: str, abstract_state: Any) -> None:
    """Raises `IncompatibleCheckpointError` if `workdir`'s newest checkpoint was written by another
    model or optimizer than `abstract_state` (`jax.eval_shape` of the train state's init).

    Reads metadata only (names, shapes, dtypes; no arrays) and writes nothing, so a changed config
    is refused at the door in a few lines, before the run takes the workdir. Local and `gs://`
    workdirs alike. A workdir without (readable) checkpoints passes: there is nothing to compare.
    """
    directory = find_checkpoint_directory(workdir)
    if directory is None:
        return
    steps, _ = _step_entries(directory)
    if steps:
        _raise_if_incompatible(directory, steps[0], abstract_state)


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _to_numpy(value) for key, value in tree.items()}
    return None if tree is None else np.asarray(tree)


def read_workdir_state(workdir: str) -> dict[str, Any]:
    """The newest intact checkpoint of one of our workdirs as host arrays: `step`, `params`,
    `ema_params` (None without EMA) and `model_state`, without building the model first.

    Verified as on resume (`read_latest`): a damaged newest checkpoint is skipped with one warning
    and the next older one is used; if none is intact, `CorruptCheckpointError` says so. Nothing is
    ever evaluated or fine-tuned from a checkpoint that failed verification.
    """
    directory = find_checkpoint_directory(workdir)
    found = None if directory is None else read_latest(directory)
    if found is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint (no numbered folders in it or in its "
                                f"{CHECKPOINTS_FOLDER}/); train first, or pass a weight file.")
    state, _ = found
    return {"step": int(np.asarray(state["step"])), "params": _to_numpy(state["params"]),
            "ema_params": _to_numpy(state.get("ema_params")) or None,
            "model_state": _to_numpy(state.get("model_state") or {})}


def read_params(path: str, *, use_ema: bool = True) -> weights.Params:
    """Params to start from or evaluate: the EMA (or raw) params of a workdir's newest intact
    checkpoint, or a weight file of any format `weights.read_weight_file` reads."""
    if workdir_lib.is_url(path) or os.path.isdir(path):
        state = read_workdir_state(path)
        return (state["ema_params"] if use_ema else None) or state["params"]
    return weights.read_weight_file(path)


class Checkpointer:
    """Saves and restores `TrainState` under `workdir/checkpoints` with orbax.

    Args:
      directory: where the step directories go (a local path or a `gs://` URL).
      every_steps: periodic save interval (the final step and SIGTERM always save).
      keep: how many of the most recent checkpoints to keep.

    Opening the directory deletes unfinished saves left by a killed run (see module docstring).
    """

    def __init__(self, directory: str | epath.Path, *, every_steps: int, keep: int):
        if every_steps <= 0 or keep <= 0:
            raise ValueError(
                f"config.checkpoint.every_steps={every_steps} and config.checkpoint.keep={keep} "
                "must both be positive."
            )
        self.every_steps = every_steps
        self._path = workdir_lib.as_path(directory)
        self._in_flight: int | None = None  # the step of the save orbax may still be writing
        self._failed = False
        unfinished = sorted(path.name for path in (self._path.iterdir() if self._path.is_dir() else ())
                            if _UNFINISHED_SAVE_MARKER in path.name)
        if unfinished and jax.process_index() == 0:
            _log.warning("Deleting unfinished checkpoint save(s) %s in %s, left by an interrupted run.",
                         ", ".join(unfinished), self._path)
        # Orbax fails to open a directory holding a step it cannot read: such leftovers go first.
        unusable = _step_entries(self._path)[1]
        for name in unusable:
            if jax.process_index() == 0:
                _log.warning("Checkpoint %s is not a readable folder (a file, a symlink or without "
                             "permissions); skipping it.", self._path / name)
        self._manager = None
        self._set_aside(unusable)
        self._manager = ocp.CheckpointManager(
            workdir_lib.checkpoint_location(self._path),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=True),
            item_handlers=_item_handlers(),
        )

    @property
    def directory(self) -> str:
        return str(self._path)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState) -> None:
        """Starts saving `state` at `step` (every process must call this; orbax coordinates).

        Returns once orbax holds a host copy of the arrays; the files are written in the
        background (`wait()` blocks until they are). The fingerprints are computed first, on
        device (`host_fingerprints`), and written in the JSON record.

        Raises:
          CheckpointSaveError: this save, or the one still in flight, could not be written.
        """
        meta = {"step": int(step), "data_position": int(step), "integrity": FINGERPRINT_FORMAT,
                "fingerprints": host_fingerprints(state)}
        with self._reporting_failed_saves(step):
            self._manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        self._in_flight = int(step)

    @contextlib.contextmanager
    def _reporting_failed_saves(self, step: int | None) -> Iterator[None]:
        """Turns orbax's failure of an asynchronous save (reported at the next save or wait, with
        a traceback per array from its background threads) into one `CheckpointSaveError`.

        In a multi-process run, a failure that is not an OS error is passed on as it is: a save
        there gathers and synchronises across processes, so what fails without an OS error is
        that collective, i.e. a peer died (killed, preempted, its coordinator gone), and the
        caller's `distributed.leave_after_failure` says so, not a disk-space hint."""
        _drop_late_reports_of_failed_io()
        try:
            yield
        except Exception as error:  # pylint: disable=broad-except  # orbax raises anything
            failed = self._in_flight if self._in_flight is not None else step
            self._failed = True
            code = _os_error_code(error)
            if code is None and jax.process_count() > 1:
                raise
            reason = (f"{os.strerror(code)} ({_WRITE_FAILURE_HINTS.get(code, 'an OS error')})" if code
                      else _short(error))
            newest = self._manager.latest_step()
            raise CheckpointSaveError(
                f"Saving the checkpoint of step {failed} to {self._path} failed: {reason}. The newest "
                f"complete checkpoint is {'none' if newest is None else f'step {newest}'}; the next run "
                "removes the unfinished save and resumes from it. Fix the cause (free space, the "
                "quota, the file-size limit or the folder's permissions), then run the same command.") from None

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
        """Restores the newest checkpoint that reads back intact, or None when there is none.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` carrying the replicated sharding,
        so restored arrays land directly on every device (re-replicated) with the right dtypes.
        Newer checkpoints that fail to restore or to verify (see module docstring) are skipped
        with one warning each and set aside.

        Raises:
          CorruptCheckpointError: checkpoints exist but none of them is intact.
          IncompatibleCheckpointError: the newest checkpoint holds another model's arrays.
        """
        self._manager.wait_until_finished()
        found = _restore_newest_intact(self._path, abstract_state)
        if found is None:
            return None
        state, meta, skipped = found
        self._set_aside(skipped)
        if jax.process_count() > 1:
            multihost_utils.assert_equal(np.int64(meta["step"]), "processes restored different steps")
        return state, meta

    def _set_aside(self, names: list[str]) -> None:
        """Moves skipped step entries out of orbax's sight, so that this run can save those steps
        again: into `corrupt_checkpoints/` (kept for inspection), or, when that move is refused
        (a folder without write permission cannot change parents), renamed in place."""
        if not names:
            return
        if jax.process_index() == 0:
            for name in names:
                self._set_aside_one(name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("nfnets_jax_checkpoints_set_aside")
        if self._manager is not None:
            self._manager.reload()

    def _set_aside_one(self, name: str) -> None:
        source = self._path / name
        corrupt_dir = self._path.parent / CORRUPT_FOLDER
        destinations = [corrupt_dir / name, corrupt_dir / f"{name}.{time.time_ns()}",
                        self._path / f"{name}{_SET_ASIDE_SUFFIX}{time.time_ns()}"]
        errors = []
        for destination in destinations:
            try:
                if destination.parent == corrupt_dir:
                    corrupt_dir.mkdir(parents=True, exist_ok=True)
                if destination.exists():
                    continue
                source.rename(destination)
            except OSError as error:
                errors.append(f"{type(error).__name__}: {error.strerror or error}")
                continue
            _log.info("Moved damaged checkpoint %s to %s.", source, destination)
            return
        raise CheckpointDirectoryError(
            f"The damaged checkpoint {source} cannot be moved aside ({'; '.join(errors[-1:])}): move or "
            f"delete it by hand (and check that {self._path} is writable), then run again. Nothing "
            "was lost.")

    def wait(self) -> None:
        """Blocks until any in-flight save is complete on disk (`CheckpointSaveError` if it failed)."""
        with self._reporting_failed_saves(None):
            self._manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        """Waits for the save in flight and closes orbax's manager; after a failed save (already
        reported), it only cleans up."""
        try:
            if not self._failed:
                self.wait()
        finally:
            with contextlib.suppress(Exception):
                self._manager.close()
