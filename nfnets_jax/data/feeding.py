"""Host batches -> device arrays, for the pmap runner and for the shard_map/jit runner.

JAX 0.10 removed `jax.device_put_sharded` / `device_put_replicated` (which the official code
used, `deepmind-research/nfnets/experiment.py:Experiment`), so placement goes through shardings:
- pmap: the host batch is `[local_devices, per_device_batch, ...]`; each leading-axis slice goes
  to its local device, as a jax.Array sharded over a one-axis mesh of those devices (the
  layout pmap itself produces, so pmap consumes it without a copy).
- shard_map/jit: the per-process batch is flattened to `[local_batch, ...]` and assembled into
  a global `[global_batch, ...]` array with `jax.make_array_from_process_local_data`.
`prefetch_to_device` keeps `size` batches in flight so host->device copies overlap compute.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PMAP_AXIS = "devices"


def put_for_pmap(host_batch: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Places slice i of every leaf's leading axis on `devices[i]` (default: local devices)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    sharding = NamedSharding(Mesh(np.array(devices), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))

    def put(leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] != len(devices):
            raise ValueError(f"A pmap host batch needs a leading axis of {len(devices)} (one slice "
                             f"per local device); got shape {leaf.shape}.")
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map(put, host_batch)


def put_for_shard_map(host_batch: Any, mesh: Mesh,
                      batch_axis: str | tuple[str, ...] = "data") -> Any:
    """Builds global arrays `[global_batch, ...]` sharded over `batch_axis` of `mesh`.

    Each process contributes its own `[local_devices, per_device_batch, ...]` batch, flattened
    to `[local_batch, ...]`; `jax.make_array_from_process_local_data` stitches the processes'
    data together in process order (JAX "Distributed data loading").
    """
    sharding = NamedSharding(mesh, PartitionSpec(batch_axis))

    def put(leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim < 2:
            raise ValueError("put_for_shard_map takes [local_devices, per_device_batch, ...] "
                             f"leaves; got shape {leaf.shape}.")
        flat = leaf.reshape((leaf.shape[0] * leaf.shape[1],) + leaf.shape[2:])
        return jax.make_array_from_process_local_data(sharding, flat)

    return jax.tree_util.tree_map(put, host_batch)


def prefetch_to_device(iterator: Iterable[Any], size: int,
                       put_fn: Callable[[Any], Any]) -> Iterator[Any]:
    """Yields `put_fn(batch)` for each host batch, keeping `size` batches already placed.

    Device transfers are asynchronous, so placing batch t+1 while step t runs hides the copy.
    `size=0` places each batch only when it is requested.
    """
    iterator = iter(iterator)
    if size < 0:
        raise ValueError(f"prefetch size must be >= 0, got {size}.")
    queue = collections.deque(put_fn(batch) for batch in itertools.islice(iterator, size))
    for batch in iterator:
        queue.append(put_fn(batch))
        yield queue.popleft()
    while queue:
        yield queue.popleft()


class BackgroundBatches:
    """Host batches produced on a daemon thread, placed on device `size` batches ahead.

    Why a thread: the loop must be able to stop between steps whatever the input pipeline is
    doing. A tf.data generator can sit for tens of seconds in one `next()` (a slow decode, a
    reshuffle), and a stop request (SIGTERM on a preemptible VM, ~30 s of notice) must not wait
    for it. `get(should_stop)` waits for the next batch but returns None as soon as
    `should_stop()` is true; `close()` asks the producer to stop and never joins it: a daemon
    thread blocked inside the pipeline cannot delay the loop.

    At interpreter exit, though, a producer thread that is still running JAX's C++ when Python
    finalizes aborts the whole process ("FATAL: exception not rethrown", exit -6): Python ends such
    a thread when it next takes the interpreter lock, and JAX's bindings cannot be unwound that way.
    A producer is in JAX's C++ not only while it places a batch but also while it drops one (a
    placed batch it could not hand over is freed as its function returns: 18 of 30 exits of a
    script that returned while its producer placed small batches aborted so, with a hook that
    waited for placements only). So an exit hook stops every live producer and waits (at most
    `EXIT_JOIN_S` in all) until it has ended or is waiting inside the input pipeline: one that is
    placing or dropping ends within milliseconds; one waiting in the pipeline holds no JAX object
    (its last placed batch is released before it asks for the next) and is left at once, so a
    stuck pipeline never delays an exit. Nor does JAX hold anything of the producer's then: a
    placement is waited for before the batch is handed over, since an asynchronous host-to-device
    copy still running at exit releases its host batch from one of JAX's own threads, which
    aborts the process the same way (a test child exited -6 so with no Python thread left inside
    JAX).
    """

    _POLL_S = 0.05
    EXIT_JOIN_S = 10.0
    _live: "weakref.WeakSet[BackgroundBatches]" = weakref.WeakSet()

    def __init__(self, iterator: Iterable[Any], size: int, put_fn: Callable[[Any], Any]):
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0, got {size}.")
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._in_pipeline = False  # True while the producer waits for the pipeline's next batch
        self._thread = threading.Thread(target=self._produce, args=(iter(iterator), put_fn),
                                        name="input-producer", daemon=True)
        self._thread.start()
        BackgroundBatches._live.add(self)

    def _offer(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self._POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, iterator: Iterator[Any], put_fn: Callable[[Any], Any]) -> None:
        try:
            while True:
                self._in_pipeline = True  # holding nothing of JAX's: the exit hook need not wait
                try:
                    batch = next(iterator)
                except StopIteration:
                    self._in_pipeline = False
                    self._offer(("end", None))
                    return
                self._in_pipeline = False
                if self._stop.is_set():
                    return
                placed = put_fn(batch)
                # Wait for the transfer: until it completes, one of JAX's C++ threads holds the host
                # batch and releases it (taking the interpreter lock) when done; if that happens
                # after this thread is back in the pipeline and the interpreter is finalizing, the
                # process aborts like a producer inside JAX does (see the class docstring).
                jax.block_until_ready(placed)
                offered = self._offer(("batch", placed))
                del placed, batch  # not held while the next batch is awaited in the pipeline
                if not offered:
                    return
        except BaseException as error:  # pylint: disable=broad-except  # re-raised by get()
            self._in_pipeline = False
            self._offer(("error", error))

    def get(self, should_stop: Callable[[], bool] | None = None) -> Any:
        """The next placed batch; None once `should_stop()` holds while waiting for it.

        Raises StopIteration at the end of a finite stream, and the producer's exception if the
        pipeline failed.
        """
        while True:
            if should_stop is not None and should_stop():
                return None
            try:
                kind, value = self._queue.get(timeout=self._POLL_S)
            except queue.Empty:
                continue
            if kind == "batch":
                return value
            if kind == "end":
                raise StopIteration
            raise value

    def close(self) -> None:
        """Asks the producer to stop; returns at once (the thread is a daemon, joined only at exit)."""
        self._stop.set()

    @classmethod
    def stop_at_exit(cls, timeout_s: float | None = None) -> None:
        """Stops every live producer and waits, `timeout_s` in all (default `EXIT_JOIN_S`), until
        each has ended or is waiting inside the input pipeline, where it holds nothing of JAX's;
        after that none can start a placement. Registered with `atexit`."""
        live = list(cls._live)
        for batches in live:
            batches._stop.set()  # pylint: disable=protected-access
        end = time.monotonic() + (cls.EXIT_JOIN_S if timeout_s is None else timeout_s)
        for batches in live:
            thread = batches._thread  # pylint: disable=protected-access
            while thread.is_alive() and not batches._in_pipeline:  # pylint: disable=protected-access
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                thread.join(timeout=min(remaining, cls._POLL_S))


atexit.register(BackgroundBatches.stop_at_exit)
