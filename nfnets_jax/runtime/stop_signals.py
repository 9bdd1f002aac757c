"""SIGTERM, SIGINT (Ctrl-C) and SIGHUP all mean: save what is worth saving and leave, in seconds.

A preemptible VM gives ~30 s between SIGTERM and the kill; a user who presses Ctrl-C or closes
the terminal (SIGHUP) expects the same care. `StopRequests` turns each of these signals into a
request that the loop honours at the next step boundary, with a checkpoint of that step, except:

- while there is nothing new to save (the restore or the init, and the first step with its
  compilation: minutes for a large model, far beyond a preemption notice), the process leaves at
  once, with one line;
- a second SIGINT leaves at once, with one line and no traceback (whatever the loop is doing).

Signals arrive in the main thread's Python handler only between bytecodes, and a compilation
runs for minutes in C++ without any; so the handlers also wake a watcher thread (through
`signal.set_wakeup_fd`), which can end the process while the main thread is still compiling
(XLA releases the GIL while it compiles).

Several processes must agree on the step at which they save (the save is collective), so there
the decision goes through JAX's preemption sync point: the coordination service started by
`jax.distributed.initialize` catches SIGTERM on any process and every process reaches the same
sync step. SIGINT and SIGHUP are passed on to it as a SIGTERM to this process.

Exit statuses, as a shell reports a death by signal: 128 + the signal's number (SIGTERM 143,
SIGINT 130, SIGHUP 129) when the process leaves at once; a stop that saved its state returns 0
for SIGTERM (a preemption is a normal event of a spot VM) and 128 + number for the others.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_status(signum: int, *, saved: bool) -> int:
    """The process's exit status after `signum`: 0 for a SIGTERM stop that saved, else 128 + signum."""
    return 0 if saved and signum == signal.SIGTERM else 128 + int(signum)


def _leave_now(message: str, status: int) -> None:
    """One line on stderr, then the process ends: no traceback, no atexit, no thread joins."""
    try:
        sys.stdout.flush()
        os.write(2, (message.rstrip() + "\n").encode())
    finally:
        os._exit(status)  # pylint: disable=protected-access


def leave_at_once(what: str) -> None:
    """Until a `StopRequests` takes over: every stop signal ends the process at once, with one
    line (`SIGINT: <what>.`) and no traceback. For a program's start (flags, checks, building the
    experiment), where there is nothing to save."""
    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum: int, frame: Any) -> None:
        del frame
        _leave_now(f"{signal_name(signum)}: {what}.", exit_status(signum, saved=False))

    for signum in STOP_SIGNALS:
        signal.signal(signum, leave)


class StopRequests:
    """Stop requests of one training run (a context manager around it).

    `should_stop(step)` is True once a stop signal arrived (on any process, multi-process);
    `signum` says which. `nothing_to_lose(True)` marks the phases in which a signal ends the
    process at once (restore, init, the first step's compilation); the loop turns it off once a
    step has been taken that a checkpoint does not hold yet.
    """

    def __init__(self, *, multi_process: bool | None = None):
        import jax  # pylint: disable=import-outside-toplevel

        self._multi_process = jax.process_count() > 1 if multi_process is None else multi_process
        self._requested = threading.Event()
        self.signum: int | None = None
        self._interrupts = 0
        self._nothing_to_lose = True
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd: int | None = None
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    # ---- the run's side ----------------------------------------------------------------------------

    def nothing_to_lose(self, value: bool) -> None:
        self._nothing_to_lose = value

    def should_stop(self, step: int) -> bool:
        if self._multi_process:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    @property
    def name(self) -> str:
        return signal_name(self.signum if self.signum is not None else signal.SIGTERM)

    # ---- installing and removing the handlers ------------------------------------------------------

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        if self._multi_process:
            for signum in (signal.SIGINT, signal.SIGHUP):
                self._previous[signum] = signal.signal(signum, self._forward_as_sigterm)
            return self
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._pipe = (read_end, write_end)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._in_main_thread)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="nfnets-stop-signals", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
            os.close(self._pipe[1])  # ends the watcher's read
            self._watcher.join(timeout=5)
            os.close(self._pipe[0])
            self._pipe = None

    # ---- what a signal does --------------------------------------------------------------------------

    def _in_main_thread(self, signum: int, frame: Any) -> None:
        """The Python-level handler: the watcher thread has already acted on the signal."""
        del signum, frame

    def _forward_as_sigterm(self, signum: int, frame: Any) -> None:
        del frame
        self.signum = signum
        os.kill(os.getpid(), signal.SIGTERM)

    def _watch(self) -> None:
        """Reads the signal numbers the C-level handler writes to the wakeup pipe, at once."""
        read_end = self._pipe[0]
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    self._act(signum)

    def _act(self, signum: int) -> None:
        name = signal_name(signum)
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts >= 2:
                _leave_now(f"{name} again: exiting now; steps since the last checkpoint are not saved.",
                           exit_status(signum, saved=False))
        if self._nothing_to_lose:
            _leave_now(f"{name}: nothing new to save yet (the last checkpoint, if any, holds this run's "
                       "state); exiting now. Run the same command to resume.", exit_status(signum, saved=False))
        if self.signum is None:
            self.signum = signum
        self._requested.set()
