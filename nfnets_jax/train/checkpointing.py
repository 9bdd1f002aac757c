"""Orbax checkpoints of the train state: every N steps, keep the last K, on SIGTERM, resume.

What is saved is the one logical copy of `TrainState` (replicated global arrays; orbax writes a
replicated array once, from one process, and coordinates multi-process saves) and a small JSON
record with the step and the position in the data stream. Saves are atomic (orbax writes to a
temporary directory and renames it when complete), so a run killed mid-save resumes from the
previous complete checkpoint. A state with non-finite values is never handed to `save`: the loop
checks first, so the last good checkpoint is never overwritten.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nfnets_jax.train.state import TrainState


class Checkpointer:
    """Saves and restores `TrainState` under `workdir/checkpoints` with orbax.

    Args:
      directory: where the step directories go.
      every_steps: periodic save interval (the final step and SIGTERM always save).
      keep: how many of the most recent checkpoints to keep.
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int):
        if every_steps <= 0 or keep <= 0:
            raise ValueError(
                f"config.checkpoint.every_steps={every_steps} and config.checkpoint.keep={keep} "
                "must both be positive."
            )
        self.every_steps = every_steps
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
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
        meta = {"step": int(step), "data_position": int(data_position)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
        """Restores the newest checkpoint into the shardings of `abstract_state`, or None.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` carrying the replicated sharding,
        so restored arrays land directly on every device (re-replicated) with the right dtypes.
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

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
