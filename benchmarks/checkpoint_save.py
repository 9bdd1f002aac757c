"""How long a checkpoint save blocks the training loop, before and after on-device fingerprints.

The state is F0-sized (`nfnet_f0`: 71.5M params, its SGD momentum and its EMA, the tree the
training loop saves, from `jax.eval_shape` of the real model and optimizer) filled with random
values on the default device. Each save is timed from the call until control returns to the
loop (`blocking_s`), and until the files are complete on disk (`complete_s`, orbax's background
write included); the two ways alternate in one process, `--repeats` times each:

- `host_crc32` (the previous save): copy every leaf to host, CRC32 it, then orbax's async save;
- `device_fingerprint` (`Checkpointer.save`): dispatch `checkpointing.fingerprint` on device,
  then orbax's async save of the state and the fingerprints.

    python -m benchmarks.checkpoint_save                        # F0, 2 repeats, a temp dir
    python -m benchmarks.checkpoint_save --model nfnet_f0 --repeats 3 --dir /path/on/fast/disk

Prints one JSON line (medians). On a shared machine, read `loadavg` (1-, 5-, 15-minute load at
the end): with 2 cores, a load above ~2 means other work shared the CPU and times are inflated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nfnets_jax import optim
from nfnets_jax.runtime import provenance
from nfnets_jax.train import checkpointing, config_schema
from nfnets_jax.models import make_forward
from nfnets_jax.train.state import init_train_state


def abstract_train_state(model: str, image_size: int = 32):
    """The `TrainState` tree of `model` with the paper's SGD + AGC + EMA, shapes only."""
    opt_config = optim.validate_optimizer_config(config_schema.base_config().optimizer)
    optimizer = optim.make_optimizer(opt_config, steps_per_epoch=100.0, total_steps=1000, batch_size=256)
    forward = make_forward(model, 1000, {})
    return jax.eval_shape(lambda: init_train_state(
        forward, optimizer, seed=0, sample_images=jnp.zeros((1, image_size, image_size, 3)), use_ema=True))


def random_state(abstract):
    """Random values (uniform floats, small ints) with the tree, shapes and dtypes of `abstract`."""
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))

    def make(key, leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jax.random.uniform(key, leaf.shape, leaf.dtype)
        return jax.random.randint(key, leaf.shape, 0, 100).astype(leaf.dtype)

    return jax.block_until_ready(jax.tree.unflatten(treedef, [make(k, l) for k, l in zip(keys, leaves)]))


def _host_crc32(state) -> dict[str, int]:
    """What each save did before: a host copy of every leaf and its CRC32."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): zlib.crc32(np.ascontiguousarray(
        np.asarray(leaf.addressable_shards[0].data)).reshape(-1).view(np.uint8)) for path, leaf in flat}


def save_host_crc32(manager: ocp.CheckpointManager, step: int, state) -> None:
    meta = {"step": step, "data_position": step, "leaf_crc32": _host_crc32(state)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nfnet_f0")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    abstract = abstract_train_state(args.model)
    state = random_state(abstract)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    root = args.dir or tempfile.mkdtemp(prefix="checkpoint_save_")
    checkpointing.host_fingerprints(state)  # compile once, outside the timing

    old = ocp.CheckpointManager(os.path.join(root, "host_crc32"),
                                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
                                item_names=("state", "meta"))
    new = checkpointing.Checkpointer(os.path.join(root, "device_fingerprint"), every_steps=1, keep=1)
    ways = {"host_crc32": (lambda step: save_host_crc32(old, step, state), old.wait_until_finished),
            "device_fingerprint": (lambda step: new.save(step, state, data_position=step), new.wait)}
    times: dict[str, dict[str, list[float]]] = {name: {"blocking_s": [], "complete_s": []} for name in ways}
    for step in range(1, args.repeats + 1):
        for name, (save, wait) in ways.items():  # alternate, so that load changes hit both
            start = time.perf_counter()
            save(step)
            blocking = time.perf_counter() - start
            wait()
            times[name]["blocking_s"].append(blocking)
            times[name]["complete_s"].append(time.perf_counter() - start)
    old.close()
    new.close()
    if args.dir is None:
        shutil.rmtree(root)

    result = {
        "benchmark": "checkpoint_save", "model": args.model, "params": num_params,
        "state_bytes": state_bytes, "repeats": args.repeats,
        "device": f"{jax.devices()[0].platform} ({jax.device_count()} devices)",
        **{name: {key: round(statistics.median(values), 3) for key, values in timing.items()}
           for name, timing in times.items()},
        "all": {name: {key: [round(v, 3) for v in values] for key, values in timing.items()}
                for name, timing in times.items()},
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "provenance": provenance.collect(),
    }
    result["blocking_speedup"] = round(result["host_crc32"]["blocking_s"] /
                                       max(result["device_fingerprint"]["blocking_s"], 1e-9), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
