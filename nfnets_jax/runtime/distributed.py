"""Multi-host start-up: `jax.distributed.initialize` from flags or from the cluster environment.

Every process runs the same program on its own devices; `jax.distributed.initialize` connects
them before anything touches a device. On TPU pods and under SLURM, JAX finds the coordinator
and the process ids itself; elsewhere they come from flags (or JAX's own
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` variables). On CPU, cross-process
collectives need an implementation (gloo), which is selected here.
"""

from __future__ import annotations

import logging
import os
import sys

import jax

from nfnets_jax.runtime import supervisor

# How long a peer may stay silent before the job counts it as dead. Spot and preemptible VMs
# (GCE, TPU VMs, AWS spot) give about 30 s of notice: a host that vanishes within it is detected
# before the platform would replace it anyway. JAX's own default is 100 s.
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


def _timeouts(heartbeat_timeout_seconds: int | None) -> dict[str, int]:
    """`jax.distributed.initialize` keywords for the heartbeat (and shutdown) timeout."""
    if heartbeat_timeout_seconds is None:
        heartbeat_timeout_seconds = DEFAULT_HEARTBEAT_TIMEOUT_S
    if heartbeat_timeout_seconds <= 0:
        raise ValueError(f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds} must be positive.")
    return {"heartbeat_timeout_seconds": heartbeat_timeout_seconds,
            "shutdown_timeout_seconds": heartbeat_timeout_seconds}


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
    heartbeat_timeout_seconds: int | None = None,
) -> bool:
    """Connects this process to the others; returns True for a multi-process run.

    Args:
      coordinator_address: `host:port` of process 0's coordinator, e.g. `10.0.0.1:1234`.
      num_processes: how many processes take part.
      process_id: this process's index in [0, num_processes).
      auto_detect: ask JAX to find the cluster itself (TPU pods: `--distributed`).
      heartbeat_timeout_seconds: how long a silent peer may go before the coordination service
        stops every process (DEFAULT_HEARTBEAT_TIMEOUT_S, 30 s, when None). A dead worker's
        collectives fail at once and the survivors leave through `leave_after_failure`; this
        bounds how long a survivor that is not in a collective waits. It is also the shutdown
        timeout.

    Give all three, or none to let JAX detect the job: always for SLURM and JAX_COORDINATOR_ADDRESS,
    and for TPU pods with `auto_detect`. Otherwise this is a single-process run and nothing happens.
    """
    explicit = [coordinator_address, num_processes, process_id]
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ValueError(
                "Multi-process runs need --coordinator_address, --num_processes and --process_id "
                "together (or none of them, to let JAX detect a TPU pod or SLURM job)."
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
        if num_processes > 1:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   **_timeouts(heartbeat_timeout_seconds))
        _one_line_orbax_errors()
        return num_processes > 1
    if auto_detect or supervisor.launcher_describes_multi_process():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**_timeouts(heartbeat_timeout_seconds))
        _one_line_orbax_errors()
        return jax.process_count() > 1
    return False


class _OrbaxErrorsWithoutTraceback(logging.Filter):
    """Keeps orbax's error records to their one-line message.

    When a peer dies during an asynchronous save, orbax's background thread logs the failed
    commit barrier with a full traceback just before `leave_after_failure` says, in one line,
    what happened and what to do; the traceback adds nothing a user can act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _one_line_orbax_errors() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxErrorsWithoutTraceback) for f in logger.filters):
        logger.addFilter(_OrbaxErrorsWithoutTraceback())


def shutdown() -> None:
    """Leaves the job cleanly (a no-op for a single-process run)."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def leave_after_failure(error: BaseException, workdir: str) -> None:
    """Ends a multi-process run whose step failed, with one line saying what to do; never returns.

    A collective fails when a peer died (killed, preempted, out of memory). Raising would run
    JAX's shutdown barrier, which waits for the dead peer until the heartbeat timeout and then
    aborts with a C++ stack dump; a clean `os._exit(1)` after one clear line is what the user
    needs. The checkpoints in `workdir` are complete or absent (orbax commits atomically), so
    restarting every process resumes exactly.
    """
    index, count = jax.process_index(), jax.process_count()
    peers = [p for p in range(count) if p != index]
    suspect = f"process {peers[0]}" if len(peers) == 1 else f"one of processes {peers}"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    sys.stdout.flush()
    sys.stderr.write(
        f"error: process {index} of {count} stopped: a collective with the other processes failed "
        f"({type(error).__name__}: {first_line}); {suspect} most likely died. Restart all {count} "
        f"processes with the same command: training resumes exactly from the last checkpoint in "
        f"{workdir}.\n")
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
