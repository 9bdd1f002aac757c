"""Workdirs: one run per workdir (a lock, real processes), each step logged once after a resume,
and a whole run, resume and evaluation on a fake object store URL.

Run as a script (`python tests/test_workdir.py WORKDIR STEPS SLEEP LR`), this file is a fake-model
training run whose batches take SLEEP seconds: the child process of the lock tests.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import pytest

import fake_object_store  # tests/fake_object_store.py
from nfnets_jax.runtime import stop_signals
import fakes  # tests/fakes.py
from nfnets_jax.runtime import workdir_lock
from nfnets_jax.train import checkpointing, loop, metrics_logging
from test_train_checkpointing import _SlowData

STEPS = 12
LOCK_LOGGER = workdir_lock.__name__


def _config(steps=STEPS, lr=0.1):
    return fakes.fake_config(**{"train.steps": steps, "checkpoint.every_steps": 4, "checkpoint.keep": 2,
                                "optimizer.lr": lr})


def _run(workdir, steps=STEPS, sleep=0.0, lr=0.1):
    config = _config(steps, lr)
    return loop.run(fakes.fake_experiment(config, _SlowData(sleep=sleep), drop_rate=0.2),
                    str(workdir), prefetch=1)


def _child(workdir, steps, sleep, lr):
    return [sys.executable, os.path.abspath(__file__), str(workdir), str(steps), str(sleep), str(lr)]


# ---- One run per workdir ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_refuses_naming_the_first_and_touches_nothing(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(_child(workdir, 1000, 0.1, 0.1), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None and not (workdir / "metrics.jsonl").exists():
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[0]
        config_before = (workdir / "config.json").read_text()
        second = subprocess.run(_child(workdir, 1000, 0.0, 0.5), capture_output=True, text=True, timeout=180)
        assert first.poll() is None  # still running: the refusal below is the lock's doing
        assert second.returncode != 0
        assert "WorkdirBusyError" in second.stderr and "is in use by another run" in second.stderr
        assert f"host {socket.gethostname()}, pid {first.pid}, started " in second.stderr, second.stderr
        assert (workdir / "config.json").read_text() == config_before  # the first run's lr, not 0.5
        assert "Deleting unfinished" not in second.stderr + second.stdout
        first.send_signal(signal.SIGTERM)  # stop the first run as a preemption would
        output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and "SIGTERM: saved step" in output, output  # undisturbed
    steps = [r["step"] for r in metrics_logging.read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one history, each step once
    assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released at the end


def _write_lock(workdir, **record):
    workdir.mkdir(parents=True, exist_ok=True)
    full = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01 00:00:00 UTC",
            "heartbeat": time.time(), "heartbeat_utc": "now", "id": "other", **record}
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(full))


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("record, why", [
    (lambda: {"pid": _dead_pid()}, "its process no longer exists"),
    (lambda: {"host": "another-host", "heartbeat": time.time() - 10 * workdir_lock.STALE_AFTER_SECONDS},
     "heartbeat is"),
])
def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(record, why, tmp_path, caplog):
    _write_lock(tmp_path, **record())
    with caplog.at_level(logging.WARNING, logger=LOCK_LOGGER):
        lock = workdir_lock.acquire(tmp_path)
    lock.release()
    warnings = [r.getMessage() for r in caplog.records if r.name == LOCK_LOGGER]
    assert len(warnings) == 1 and "Took over the lock" in warnings[0] and why in warnings[0], warnings


def test_a_live_lock_on_another_host_is_respected(tmp_path):
    _write_lock(tmp_path, host="another-host", pid=1234)
    with pytest.raises(workdir_lock.WorkdirBusyError, match=r"host another-host, pid 1234, started 2026-01-01"):
        workdir_lock.acquire(tmp_path)


def test_the_heartbeat_refreshes_and_a_taken_over_lock_is_noticed(tmp_path):
    lock = workdir_lock.acquire(tmp_path, refresh_s=3600)
    first = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.01)
    lock.refresh()
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["heartbeat"] > first
    _write_lock(tmp_path, host="another-host")  # another run decided this one was dead
    lock.refresh()
    assert lock.lost
    lock.release()
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["host"] == "another-host"


# ---- Each step once in metrics.jsonl after a resume ---------------------------------------------

def test_trim_metrics_keeps_steps_up_to_the_resumed_one_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": "train"}) for s in (1, 2, 3, 4, 5, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 7, "spl')
    assert metrics_logging.trim_metrics(path, last_step=4) == 3
    assert [r["step"] for r in metrics_logging.read_metrics(path)] == [1, 2, 3, 4]


# ---- A fake object store ------------------------------------------------------------------------

@pytest.fixture()
def store(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv(fake_object_store.ENV_ROOT, str(root))
    fake_object_store.register(str(root))
    monkeypatch.chdir(tmp_path)  # a stray relative `fakegs:` folder would show up here
    return root


@pytest.mark.slow
def test_train_preempt_resume_and_evaluate_on_an_object_store_url(store, tmp_path, monkeypatch):
    url = "fakegs://bucket/runs/one"
    with monkeypatch.context() as patch:
        patch.setattr(stop_signals.StopRequests, "should_stop", lambda self, step: step == 6)
        assert _run(url).stopped_by == "preempted"
    summary = _run(url)
    assert summary.stopped_by == "completed" and summary.step == STEPS
    assert summary.metrics_file == f"{url}/metrics.jsonl" and summary.plot_file == f"{url}/training_curves.png"
    _run(tmp_path / "local")  # the uninterrupted reference, on a local disk
    on_store = checkpointing.read_workdir_state(url)
    chex.assert_trees_all_equal(on_store, checkpointing.read_workdir_state(str(tmp_path / "local")))
    backing = store / "bucket" / "runs" / "one"
    assert sorted(os.listdir(backing)) == ["checkpoints", "config.json", "metrics.jsonl", "provenance.json", "tb",
                                           "training_curves.png"]
    assert sorted(os.listdir(backing / "checkpoints")) == ["12", "8"]
    assert os.listdir(backing / "tb")
    steps = [r["step"] for r in metrics_logging.read_metrics(backing / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    assert sorted(os.listdir(tmp_path)) == ["local", "store"]  # nothing bypassed the store


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _run(sys.argv[1], steps=int(sys.argv[2]), sleep=float(sys.argv[3]), lr=float(sys.argv[4]))
