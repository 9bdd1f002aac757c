"""The watcher around each process of a multi-process run (nfnets_jax/runtime/supervisor.py):
JAX's C++ dead-peer abort becomes one line; every other exit, signal and output passes unchanged;
signals reach the child and `kill -9` of the watcher kills the child.

Each case runs a real watcher process (this file as a script) around a small Python child.
"""

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nfnets_jax.runtime import supervisor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HINT = "Restart all processes with the same command."
# What jaxlib 0.10's client prints when the coordinator dies (recorded from a real run; the
# survivor then aborts with SIGABRT).
RUNTIME_WARNINGS = (
    "W1201 04:14:09.500296    5741 preemption_sync_manager.cc:147] Failed to retrieve preemption "
    "notice from coordination service: UNAVAILABLE: Socket closed\n"
    "Additional GRPC error information from remote target coordination_service while calling "
    "/xla.coordination.CoordinationService/GetKeyValue:\n"
    "E1201 04:14:09.500470    5741 coordination_service_agent.cc:289] Polled an error from "
    "coordination service (this can be an error from this or another task).\n")
FATAL_REPORT = (
    "F1201 04:14:09.500478    5741 client.h:80] Terminating process because the JAX distributed "
    "service detected fatal errors. This most likely indicates that another task died; absl::Status: "
    "UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was "
    "preempted/died/restarted unexpectedly or this task is experiencing network issues.\n"
    "*** Check failure stack trace: ***\n"
    "    @     0x7faabae40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()\n")


def _watch(child_code: str, *, process_id=1, num_processes=2, **popen):
    """Starts a watcher (this file as a script) around `python -c child_code`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop(supervisor.CHILD_ENV, None)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(process_id), str(num_processes),
                             textwrap.dedent(child_code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(watcher, timeout=60):
    out, err = watcher.communicate(timeout=timeout)
    return watcher.returncode, out, err


def test_the_runtime_abort_on_a_dead_coordinator_becomes_one_line():
    code, out, err = _finish(_watch(f"""
        import os, sys
        print("training step 7", flush=True)
        sys.stderr.write("an ordinary warning\\n"); sys.stderr.flush()
        sys.stderr.write({RUNTIME_WARNINGS!r}); sys.stderr.flush()
        sys.stderr.write({FATAL_REPORT!r}); sys.stderr.flush()
        os.abort()
    """))
    assert code == 1
    assert out == "training step 7\n"
    lines = err.strip().splitlines()
    assert lines[0] == "an ordinary warning", err
    assert len(lines) == 2, err  # the runtime's warnings and the C++ dump are gone
    assert lines[1].startswith("error: process 1 of 2 stopped") and "process 0 (the coordinator)" in lines[1]
    assert lines[1].endswith(HINT)


def test_no_second_line_when_the_child_said_what_happened_before_the_runtime_aborted():
    code, _, err = _finish(_watch(f"""
        import os, sys
        sys.stderr.write("error: process 1 of 2 stopped: a collective failed\\n"); sys.stderr.flush()
        sys.stderr.write({FATAL_REPORT!r}); sys.stderr.flush()
        os.abort()
    """))
    assert code == 1 and err == "error: process 1 of 2 stopped: a collective failed\n", err


def test_runtime_warnings_without_an_abort_are_shown_and_exit_codes_pass_through():
    code, out, err = _finish(_watch(f"""
        import sys, time
        sys.stderr.write({RUNTIME_WARNINGS!r}); sys.stderr.flush()
        print("still going", flush=True)
        sys.exit(3)
    """))
    assert code == 3 and out == "still going\n"
    assert err == RUNTIME_WARNINGS  # held back briefly, then shown whole, in order


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV])
def test_a_child_killed_by_a_signal_makes_the_watcher_die_of_the_same_signal(signum):
    code, _, err = _finish(_watch(f"import os; os.kill(os.getpid(), {int(signum)})"))
    assert code == -signum, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sent_to_the_watcher_reaches_the_child_once(signum):
    watcher = _watch(f"""
        import signal, sys, time
        def stop(*_):
            print("saved; exiting", flush=True)
            sys.exit(0)
        signal.signal({int(signum)}, stop)
        print("ready", flush=True)
        time.sleep(60)
    """, stdin=subprocess.DEVNULL)  # not a terminal: nobody else sends the child a Ctrl-C
    assert watcher.stdout.readline() == "ready\n"
    watcher.send_signal(signum)
    code, out, _ = _finish(watcher)
    assert code == 0 and out == "saved; exiting\n"


def test_kill_9_of_the_watcher_kills_the_child(tmp_path):
    pid_file = tmp_path / "child.pid"
    watcher = _watch(f"""
        import os, time
        from nfnets_jax.runtime import supervisor
        supervisor.die_with_watcher()
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    watcher.kill()
    watcher.communicate(timeout=30)
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_the_line_names_the_peer_that_missed_its_heartbeats():
    report = ("F0101 00:00:00.000000 1 client.h:80] Terminating process because the JAX distributed "
              "service detected fatal errors. absl::Status: UNAVAILABLE: Task /job:jax_worker/replica:0/task:2 "
              "heartbeat timeout.")
    line = supervisor.dead_peer_line(report, 0, 4, HINT)
    assert line.startswith("error: process 0 of 4 stopped") and "process 2 most likely died" in line
    assert "coordinator" not in line
    assert "process 0 (the coordinator)" in supervisor.dead_peer_line(FATAL_REPORT, 3, 4, HINT)
    # The service's own wording when it declares peers dead (recorded from a real run).
    unhealthy = ("F0101 client.h:80] Terminating process because the JAX distributed service detected fatal "
                 "errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending "
                 "heartbeats):\n1\n3\nThe tasks have crashed.")
    assert "processes 1, 3 most likely died" in supervisor.dead_peer_line(unhealthy, 0, 4, HINT)


def test_the_filter_holds_only_runtime_lines_and_keeps_order_of_the_rest():
    out = io.BytesIO()
    stream = supervisor._StderrFilter(out)  # pylint: disable=protected-access
    other = b"I0000 00:00:00.000000 1 port.cc:153] not the distributed runtime\n"
    stream.feed(b"a\n" + RUNTIME_WARNINGS.encode() + other + b"b\npartial")
    # Runtime lines (with their unprefixed continuation lines) are held; others pass at once; a
    # partial line waits for its end.
    assert out.getvalue() == b"a\n" + other + b"b\n"
    stream.tick(final=True)
    assert out.getvalue() == b"a\n" + other + b"b\n" + RUNTIME_WARNINGS.encode() + b"partial"


if __name__ == "__main__":
    supervisor.supervise([sys.executable, "-c", sys.argv[3]], process_id=int(sys.argv[1]),
                         num_processes=int(sys.argv[2]), restart_hint=HINT)
