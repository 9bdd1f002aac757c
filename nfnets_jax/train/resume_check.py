"""Before a run touches an existing workdir: does its checkpoint hold this model's parameters?

Resuming a workdir with a changed model (other widths, depths, classes) cannot work: orbax would
fail deep inside the restore with thousands of lines, after `config.json` had been overwritten
with the incompatible config. This check reads only the checkpoint's metadata (names, shapes,
dtypes; no array data) and compares it with the model's abstract parameters, so the mismatch is
reported in a few lines and the workdir is left as it was.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from nfnets_jax import checkpoints

_MAX_LISTED = 4


def _latest_step_dir(workdir: str) -> tuple[str, int] | None:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    return (directory, max(steps)) if steps else None


def _saved_param_shapes(directory: str, step: int) -> dict[str, tuple[int, ...]] | None:
    """`module/leaf -> shape` of the params saved at `step`, from metadata only; None if unreadable
    (a damaged checkpoint is the restore's business: it skips it and tries an older one)."""
    try:
        manager = ocp.CheckpointManager(
            os.path.abspath(directory), item_handlers={"state": ocp.StandardCheckpointHandler()})
        try:
            metadata = manager.item_metadata(step)["state"]
        finally:
            manager.close()
        params = getattr(metadata, "tree", metadata)["params"]
    except Exception:  # pylint: disable=broad-except  # any unreadable metadata: no verdict
        return None
    return {name: tuple(leaf.shape) for name, leaf in checkpoints.flatten_params(params).items()}


def check_resumable(workdir: str, abstract_params: Any) -> None:
    """Raises ValueError listing the differing parameters if `workdir`'s newest checkpoint was
    written by another model than `abstract_params` (`jax.eval_shape` of the model's init).

    A workdir without checkpoints (or with unreadable ones) passes: there is nothing to compare.
    """
    if "://" in workdir:
        return
    latest = _latest_step_dir(os.path.abspath(workdir))
    if latest is None:
        return
    saved = _saved_param_shapes(*latest)
    if saved is None:
        return
    expected = {name: tuple(leaf.shape)
                for name, leaf in checkpoints.flatten_params(abstract_params).items()}
    differences = [f"{name}: checkpoint {list(saved[name])}, model {list(expected[name])}"
                   for name in sorted(saved.keys() & expected.keys()) if saved[name] != expected[name]]
    differences += [f"{name}: in the checkpoint, not in the model" for name in sorted(saved.keys() - expected.keys())]
    differences += [f"{name}: in the model, not in the checkpoint" for name in sorted(expected.keys() - saved.keys())]
    if not differences:
        return
    listed = differences[:_MAX_LISTED] + (
        [f"... and {len(differences) - _MAX_LISTED} more"] if len(differences) > _MAX_LISTED else [])
    raise ValueError(
        f"{workdir} holds a run of another model (checkpoint step {latest[1]}); "
        f"{len(differences)} parameter(s) differ:\n" + "\n".join(listed) + "\n"
        "Nothing was changed. To continue that run, use its config (the workdir's config.json); to "
        "train this model, pass a new --workdir.")

