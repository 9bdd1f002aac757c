"""A watcher process around each process of a multi-host run, so that a dead peer ends the job
in one line on every survivor, whichever process died.

When a peer dies, the survivors learn it two ways at once: their next collective fails (handled
in Python by `distributed.leave_after_failure`, one line, exit 1), and JAX's distributed-runtime
client, which polls the coordination service for errors in a C++ thread, logs a FATAL line
("Terminating process because the JAX distributed service detected fatal errors") and aborts the
process with a C++ stack dump. When the coordinator (process 0) dies, the second path usually
wins, and nothing inside the process can stop it: the client's own error callback cannot be
replaced from Python (jaxlib passes it a status object that has no Python type), and the abort
comes from a C++ thread.

So `experiments.train` and `experiments.eval`, in a multi-process run, re-run their own command
line as a child and watch it from outside (`supervise`): the child's stdout and stdin are the
terminal's, its stderr passes through the watcher line by line. If the child aborts after the
client's FATAL line, the watcher drops the C++ dump (and the distributed-runtime warnings that
lead up to it) and prints one line naming the dead process and what to do; any other exit is
passed on unchanged: the same exit code, or the same signal. Signals sent to the watcher
(SIGTERM from a scheduler, SIGINT, SIGHUP) are forwarded to the child (except a Ctrl-C, which
the terminal already sends to both), and the child dies with the watcher (`PR_SET_PDEATHSIG`),
so `kill -9` of the watcher still kills the whole process.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

CHILD_ENV = "NFNETS_SUPERVISOR_PID"  # set in the child: the watcher's pid
DISABLE_ENV = "NFNETS_NO_SUPERVISOR"  # =1: no watcher (to see the runtime's raw output)
FATAL_MARKER = "Terminating process because the JAX distributed service detected fatal errors"
# A C++ log line: severity, MMDD, time, thread id, source file:line] (absl / glog format).
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<source>[\w./-]+):\d+\] ")
# The distributed runtime's sources whose lines precede the FATAL one: held back briefly, dropped
# if the FATAL line follows, shown otherwise.
_RUNTIME_SOURCES = ("preemption_sync_manager.cc", "coordination_service_agent.cc", "client.h",
                    "coordination_service.cc", "distributed_runtime")
HOLD_SECONDS = 3.0
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def launcher_describes_multi_process() -> bool:
    """True when a launcher has described a job of more than one process in the environment.

    SLURM sets SLURM_NTASKS; JAX's own variables name the coordinator. TPU pods are detected by
    JAX from the TPU metadata, which is only queried when asked (`--distributed`), so that a
    single machine never waits on a metadata server.
    """
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
        return True
    return "JAX_COORDINATOR_ADDRESS" in os.environ


def wanted(multi_process: bool) -> bool:
    """Whether this process should start a watcher: a multi-process run, not already watched,
    not disabled by NFNETS_NO_SUPERVISOR=1."""
    return multi_process and not is_child() and os.environ.get(DISABLE_ENV, "") not in ("1", "true")


def is_child() -> bool:
    """True in the process that a watcher started (it must not start another)."""
    return CHILD_ENV in os.environ


def die_with_watcher() -> None:
    """In the child: be killed when the watcher dies (Linux), so `kill -9 <watcher>` is `kill -9`
    of the run. Exits at once if the watcher is already gone."""
    watcher = int(os.environ.get(CHILD_ENV, "0"))
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if watcher and os.getppid() != watcher:
        os._exit(1)  # pylint: disable=protected-access


def dead_peer_line(text: str, process_id: int | None, num_processes: int | None, restart_hint: str) -> str:
    """Our one line for the client's FATAL report `text` (the FATAL line and what follows)."""
    me = "this process" if process_id is None else f"process {process_id}"
    of = f" of {num_processes}" if num_processes else ""
    tasks = {int(t) for t in re.findall(r"/task:(\d+)", text)}
    for listed in re.findall(r"stopped sending heartbeats\):\s*((?:\d+[\s,]*)+)", text):
        tasks.update(int(t) for t in re.findall(r"\d+", listed))  # "...heartbeats):\n1\n"
    tasks = sorted(tasks - {process_id})
    if re.search(r"leader task|Failed to send RPC to coordination service|coordination service.*unavailable",
                 text, re.IGNORECASE) and process_id != 0:
        suspect = "process 0 (the coordinator) most likely died or became unreachable"
    elif tasks:
        names = ", ".join(str(t) for t in tasks)
        suspect = f"process{'es' if len(tasks) > 1 else ''} {names} most likely died (missed heartbeats)"
    else:
        suspect = "another process most likely died"
    return (f"error: {me}{of} stopped: the JAX coordination service reported a failed peer; "
            f"{suspect}. {restart_hint}")


class _StderrFilter:
    """The child's stderr, passed on line by line, with the dead-peer dump replaced by one line."""

    def __init__(self, out) -> None:
        self.out = out
        self.pending = b""
        self.held: list[tuple[float, bytes]] = []  # distributed-runtime lines, (time, line)
        self.holding_group = False  # the last line was held: its continuation lines are too
        self.fatal: list[str] = []  # the FATAL line and everything after it
        self.error_shown = False  # the child has said what went wrong itself (an `error: ` line)

    def feed(self, data: bytes) -> None:
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self._line(line + b"\n")

    def _line(self, line: bytes) -> None:
        text = line.decode(errors="replace")
        if self.fatal or FATAL_MARKER in text:
            self.fatal.append(text)
            return
        match = _LOG_LINE.match(text)
        if match:
            self.holding_group = any(s in match.group("source") for s in _RUNTIME_SOURCES)
        if self.holding_group:
            self.held.append((time.monotonic(), line))
        else:
            self._write(line)

    def tick(self, *, final: bool = False) -> None:
        """Shows held lines older than HOLD_SECONDS (all of them when `final`) unless a FATAL
        report has made them part of the dump; and a partial last line when `final`."""
        if self.fatal:
            self.held = []
            return
        now = time.monotonic()
        while self.held and (final or now - self.held[0][0] > HOLD_SECONDS):
            self._write(self.held.pop(0)[1])
        if final and self.pending:
            if FATAL_MARKER in self.pending.decode(errors="replace"):
                self.fatal.append(self.pending.decode(errors="replace"))
            else:
                self._write(self.pending)
            self.pending = b""

    def _write(self, data: bytes) -> None:
        self.error_shown = self.error_shown or data.startswith(b"error: ")
        self.out.write(data)
        self.out.flush()


def supervise(command: Sequence[str], *, process_id: int | None, num_processes: int | None,
              restart_hint: str) -> NoReturn:
    """Runs `command` as a watched child (see the module docstring) and exits as it did."""
    env = dict(os.environ, **{CHILD_ENV: str(os.getpid())})
    child = subprocess.Popen(list(command), env=env, stderr=subprocess.PIPE)  # pylint: disable=consider-using-with

    def forward(signum, _frame):
        if signum == signal.SIGINT and _terminal_sends_to_our_group():
            return  # Ctrl-C: the terminal has sent it to the child too; once is enough
        if child.poll() is None:
            child.send_signal(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    stream = _StderrFilter(sys.stderr.buffer)
    descriptor = child.stderr.fileno()
    while True:
        try:
            ready, _, _ = select.select([descriptor], [], [], 0.5)
        except InterruptedError:
            continue
        if ready:
            data = os.read(descriptor, 65536)
            if not data:
                break
            stream.feed(data)
        stream.tick()
    returncode = child.wait()
    stream.tick(final=True)
    sys.stdout.flush()
    if stream.fatal and returncode != 0:
        if not stream.error_shown:  # the child's own dead-peer line may have won the race
            sys.stderr.write(dead_peer_line("".join(stream.fatal), process_id, num_processes, restart_hint)
                             + "\n")
            sys.stderr.flush()
        os._exit(1)  # pylint: disable=protected-access
    if stream.fatal:  # the FATAL report without a failed exit: show it as it was
        sys.stderr.write("".join(stream.fatal))
        sys.stderr.flush()
    if returncode < 0:  # died of a signal: die of the same one
        if -returncode not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
        time.sleep(5)
    os._exit(returncode & 0xFF)  # pylint: disable=protected-access


def _terminal_sends_to_our_group() -> bool:
    """True when this process group is the foreground group of the terminal on stdin, so that
    keyboard signals (Ctrl-C) reach the child directly."""
    try:
        return sys.stdin is not None and sys.stdin.isatty() and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def own_command() -> list[str]:
    """This process's command line as it was typed (interpreter options and `-m` included)."""
    return [sys.executable, *sys.orig_argv[1:]]
