"""Two ways to run the same per-device step on many devices: pmap and jit(shard_map).

Why both: the design is pmap-shaped (one per-device function with `axis_name` collectives, as in
the official code, `experiment.py:Experiment`), but in current JAX `jax.pmap` is itself implemented
as `jit(shard_map)` and is in maintenance mode (JAX 0.8.0 changelog). `config.parallel.backend`
picks one; tests check they give the same params.

Both backends keep the train state as ONE logical copy, replicated over all devices
(`NamedSharding(mesh, P())`), never stacked with a device axis: no `device_put_replicated`, no
hidden `x[0]`, and checkpoints hold one copy. Batches come from the host as
`[local_devices, per_device_batch, ...]` and are placed by `nfnets_jax.data.feeding`: one slice per
local device for pmap, a global `[global_batch, ...]` array split over the 'batch' axis for
shard_map. Either way the per-device step sees `[per_device_batch, ...]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nfnets_jax.data import feeding
from nfnets_jax.train import config_schema
from nfnets_jax.train.step import AXIS_NAME

BACKENDS = config_schema.BACKENDS


@dataclasses.dataclass(frozen=True)
class Backend:
    """A way of running per-device steps: place data, wrap train/eval steps.

    Attributes:
      name: 'pmap' or 'shard_map'.
      mesh: all devices of all processes on one 'batch' axis.
      wrap_train: per-device `(state, batch) -> (state, metrics)` to a compiled function over
        the global state and a placed batch; the state argument is donated.
      wrap_eval: per-device `(params, model_state, batch) -> sums` likewise.
      put_batch: host-local numpy batch `[local_devices, B, ...]` -> what `wrap_*` functions take.
    """

    name: str
    mesh: Mesh
    wrap_train: Callable[[Callable], Callable]
    wrap_eval: Callable[[Callable], Callable]
    put_batch: Callable[[Any], Any]

    @property
    def replicated(self) -> NamedSharding:
        """The sharding of the train state: one logical copy on every device."""
        return NamedSharding(self.mesh, P())

    def to_global(self, tree: Any) -> Any:
        """The replicated state as global arrays over all processes' devices (for orbax).

        In a multi-process run `jax.pmap` returns its `out_axes=None` outputs as process-local
        arrays (replicated over this process's devices only); a collective save needs global
        ones. The device buffers are reused, nothing is copied. Single-process: unchanged.
        """
        if jax.process_count() == 1:
            return tree

        def globalize(x):
            if not isinstance(x, jax.Array) or not x.is_fully_addressable:
                return x
            return jax.make_array_from_single_device_arrays(
                x.shape, self.replicated, [shard.data for shard in x.addressable_shards])

        return jax.tree.map(globalize, tree)

    def replicate(self, tree: Any) -> Any:
        """Places a host pytree (the same on every process) as replicated global arrays."""
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """One mesh axis, 'batch', over `devices` (default: every device of every process; data
    parallelism)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (AXIS_NAME,))


def make_pmap_backend() -> Backend:
    """`jax.pmap` with the state broadcast (`in_axes=None`) and returned replicated."""
    mesh = make_mesh()

    def wrap_train(step_fn):
        return jax.pmap(
            step_fn, axis_name=AXIS_NAME, in_axes=(None, 0), out_axes=(None, None), donate_argnums=(0,)
        )

    def wrap_eval(eval_fn):
        return jax.pmap(eval_fn, axis_name=AXIS_NAME, in_axes=(None, None, 0), out_axes=None)

    # pmap takes process-local arrays with a leading local-device axis.
    return Backend("pmap", mesh, wrap_train, wrap_eval, feeding.put_for_pmap)


def make_shard_map_backend(devices: Sequence[jax.Device] | None = None) -> Backend:
    """`jax.jit(jax.shard_map(...))` over the global mesh (or `devices`: one device is how the
    benchmarks and the memory plan compile the runner's step); batches become global arrays.

    `check_vma=False` gives the step pmap's semantics: the gradient of the replicated params is
    each device's own gradient, which the step then averages with `pmean` (and which SAM perturbs
    per device). With the check on, shard_map's autodiff would already sum the gradient of a
    replicated input over devices, and the step's pmean would leave a sum, not a mean.
    """
    mesh = make_mesh(devices)

    def wrap_train(step_fn):
        mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS_NAME)), out_specs=(P(), P()),
                               check_vma=False)
        return jax.jit(mapped, donate_argnums=(0,))

    def wrap_eval(eval_fn):
        mapped = jax.shard_map(eval_fn, mesh=mesh, in_specs=(P(), P(), P(AXIS_NAME)), out_specs=P(),
                               check_vma=False)
        return jax.jit(mapped)

    def put_batch(batch):
        # Each process contributes its examples to the global [global_batch, ...] array.
        return feeding.put_for_shard_map(batch, mesh, AXIS_NAME)

    return Backend("shard_map", mesh, wrap_train, wrap_eval, put_batch)


def make_backend(name: str) -> Backend:
    """Returns the backend named by `config.parallel.backend`."""
    if name == "pmap":
        return make_pmap_backend()
    if name == "shard_map":
        return make_shard_map_backend()
    raise ValueError(f"config.parallel.backend={name!r} is not one of {BACKENDS}; pick one of them.")


def first_replica(tree: Any) -> Any:
    """Host numpy copy of a replicated tree, read from this process's first addressable shard.

    Explicit about which copy it reads (no hidden `x[0]` on a device axis); works in
    multi-process runs where the global array is not fully addressable.
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)
