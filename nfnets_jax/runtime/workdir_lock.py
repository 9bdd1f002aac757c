"""One run per workdir: a lock file that names its run and proves it is alive.

Two runs in one workdir interleave checkpoints and metrics, and the second one deletes the first
one's in-progress save as "left by an interrupted run". So a run takes `workdir/run.lock` before
it touches anything else in the workdir, and a second run refuses with a message naming the
first (host, pid, start time).

The lock is a small JSON record created only if absent and refreshed (a heartbeat timestamp)
only if unchanged since the last refresh, both through conditional writes
(`workdir.compare_and_swap`), so it holds on `gs://` as well as on local disks and of several
runs racing for a free or abandoned workdir exactly one wins. A lock whose run is gone is taken
over with a warning: on the same host when its pid no longer exists, from any host when its
heartbeat is older than `stale_after_s` (a run refreshes it every `refresh_s`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from etils import epath

from nfnets_jax.runtime import workdir as workdir_lib

_log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
REFRESH_SECONDS = 15.0
STALE_AFTER_SECONDS = 90.0


class WorkdirLockError(RuntimeError):
    """The workdir's lock cannot be taken; nothing in the workdir was touched (the message says why)."""


class WorkdirBusyError(WorkdirLockError):
    """Another live run holds the workdir's lock; nothing in the workdir was touched."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(record: dict) -> str:
    return (f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started')}, "
            f"last heartbeat {record.get('heartbeat_utc')}")


class WorkdirLock:
    """The held lock of one run; refreshes itself in a daemon thread until `release()`."""

    def __init__(self, path: epath.Path, record: dict, *, refresh_s: float):
        self.path = path
        self.record = record
        self._content = _encode(record)
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(target=self._refresh_loop, args=(refresh_s,),
                                        name="nfnets-workdir-lock", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        """True if another run took the lock over (this run's heartbeat stopped for too long)."""
        return self._lost

    def _refresh_loop(self, refresh_s: float) -> None:
        while not self._stop.wait(refresh_s):
            self.refresh()

    def refresh(self) -> None:
        record = {**self.record, "heartbeat": time.time(), "heartbeat_utc": _utc_now()}
        new = _encode(record)
        try:
            swapped = workdir_lib.compare_and_swap(self.path, self._content, new)
        except Exception as error:  # pylint: disable=broad-except  # a transient storage error
            _log.warning("Could not refresh the workdir lock %s: %s", self.path, error)
            return
        if swapped:
            self.record, self._content = record, new
        elif not self._lost:
            self._lost = True
            _log.error("The workdir lock %s was taken over by another run; this run no longer owns "
                       "the workdir.", self.path)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self._lost:
            workdir_lib.compare_and_swap(self.path, self._content, None)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _is_abandoned(record: dict, *, stale_after_s: float) -> str | None:
    """Why the lock's run is gone, or None if it may be alive."""
    age = time.time() - float(record.get("heartbeat", 0))
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", -1))
        if pid == os.getpid():  # a restarted machine or container handed this run the same pid
            return "its pid is this process's own"
        if not _pid_alive(pid):
            return "its process no longer exists"
    if age > stale_after_s:
        return f"its heartbeat is {age:.0f}s old (more than {stale_after_s:.0f}s)"
    return None


def acquire(workdir: str | os.PathLike, *, refresh_s: float = REFRESH_SECONDS,
            stale_after_s: float = STALE_AFTER_SECONDS) -> WorkdirLock:
    """Takes `workdir`'s lock (creating the workdir), or raises `WorkdirBusyError` (another run
    holds it) or `WorkdirLockError` (the folder or the lock file cannot be used: a `run.lock`
    that is a folder, a bucket that does not exist, no permission), each in one message.

    Reads nothing else and writes nothing else in the workdir before the lock is held.
    """
    try:
        return _acquire(workdir, refresh_s=refresh_s, stale_after_s=stale_after_s)
    except WorkdirLockError:
        raise
    except Exception as error:  # pylint: disable=broad-except  # the filesystem's or TensorStore's
        path = workdir_lib.as_path(workdir) / LOCK_FILE
        reason = str(error).split("[tensorstore_spec")[0].strip().splitlines()
        reason = f"{type(error).__name__}: {reason[0][:300] if reason else ''}"
        hint = (f"{path} is a folder, not this project's lock file: move it out of the way"
                if isinstance(error, IsADirectoryError) or (workdir_lib.is_url(path) is False and path.is_dir())
                else "check that the workdir (and, for gs://, its bucket) exists or can be created, and "
                     "that you can write to it")
        raise WorkdirLockError(f"Cannot take the workdir's lock {path} ({reason}); {hint}. Nothing "
                               "was written.") from None


def _acquire(workdir: str | os.PathLike, *, refresh_s: float, stale_after_s: float) -> WorkdirLock:
    directory = workdir_lib.as_path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
              "started": _utc_now(), "heartbeat": now, "heartbeat_utc": _utc_now()}
    for _ in range(5):  # retried only when another run changed the lock between read and write
        current = workdir_lib.read_bytes_or_none(path)
        if current is not None:
            try:
                holder = json.loads(current)
            except ValueError:
                holder = {}
            gone = _is_abandoned(holder, stale_after_s=stale_after_s) if holder else "it is unreadable"
            if gone is None:
                raise WorkdirBusyError(
                    f"{directory} is in use by another run ({describe(holder)}). Wait for it to "
                    "finish or stop it, or use another --workdir. (If that run is gone, its lock "
                    f"{path} is taken over automatically once its heartbeat is older than "
                    f"{stale_after_s:.0f}s.)")
        if workdir_lib.compare_and_swap(path, current, _encode(record)):
            if current is not None:
                _log.warning("Took over the lock of %s from a run that is gone (%s; %s).", directory,
                             describe(holder) if holder else "no readable record", gone)
            return WorkdirLock(path, record, refresh_s=refresh_s)
    raise WorkdirBusyError(f"{directory}: several runs are starting in it at once; start only one.")


def acquire_for_run(workdir: str | os.PathLike) -> WorkdirLock | None:
    """Process 0 takes the lock (returned; None on other processes); every process raises
    `WorkdirLockError` if it could not, so that none of them touches the workdir."""
    import jax  # pylint: disable=import-outside-toplevel

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = acquire(workdir)
        except WorkdirLockError as failure:
            error = failure
    if jax.process_count() > 1:
        import numpy as np  # pylint: disable=import-outside-toplevel
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not held and error is None:
            error = WorkdirLockError(f"{workdir}: process 0 could not take the workdir's lock (see its message).")
    if error is not None:
        raise error
    return lock
