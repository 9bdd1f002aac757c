"""Start from trained weights: DeepMind's or timm's released files, our `.npz`, or one of our workdirs.

Fine-tuning (paper §6.2, App. A.5) starts from pretrained params with a new classifier for the target
dataset's classes; evaluation-only runs load params as they are. Either way the loaded names and
shapes are checked against the model before anything runs, and every mismatch is listed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from nfnets_jax import checkpoints
from nfnets_jax.train import checkpointing
from nfnets_jax.train import workdir as workdir_lib

Params = dict[str, dict[str, np.ndarray]]
_ZIP_MAGIC = b"PK\x03\x04"


def _latest_checkpoint_dir(path: str) -> epath.Path | None:
    """`path` itself if it holds orbax step directories, or its `checkpoints/` subfolder."""
    root = workdir_lib.as_path(path)
    for candidate in (root / "checkpoints", root):
        if candidate.is_dir() and any(child.name.isdigit() for child in candidate.iterdir()):
            return candidate
    return None


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _to_numpy(value) for key, value in tree.items()}
    return None if tree is None else np.asarray(tree)


def read_workdir_state(workdir: str) -> dict[str, Any]:
    """The newest intact checkpoint of one of our workdirs as host arrays: `step`, `params`,
    `ema_params` (None without EMA) and `model_state`, without building the model first.

    Read through the same verifying reader as resume (`checkpointing.read_latest`): a damaged
    newest checkpoint is skipped with one warning and the next older one is used; if none is
    intact, `checkpointing.CorruptCheckpointError` says so. Nothing is ever evaluated or
    fine-tuned from a checkpoint that failed verification.
    """
    directory = _latest_checkpoint_dir(workdir)
    found = None if directory is None else checkpointing.read_latest(directory)
    if found is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint (no numbered folders in it or in its "
                                "checkpoints/); train first, or pass a weight file.")
    state, _ = found
    return {"step": int(np.asarray(state["step"])), "params": _to_numpy(state["params"]),
            "ema_params": _to_numpy(state.get("ema_params")) or None,
            "model_state": _to_numpy(state.get("model_state") or {})}


def read_workdir_params(workdir: str, *, use_ema: bool = True) -> Params:
    """The EMA params (or raw params) of the newest checkpoint in one of our workdirs."""
    state = read_workdir_state(workdir)
    params = state["ema_params"] if use_ema else None
    return params or state["params"]


def read_params(path: str, *, use_ema: bool = True) -> Params:
    """Params from a workdir (our orbax checkpoints), our `.npz`, DeepMind's pickle `.npz`, or
    timm's `dm_nfnet_f*` `.safetensors` (converted to our names, `checkpoints.load_timm_nfnet`).

    DeepMind's released `F*_haiku.npz` files are dill pickles, not zip archives (official
    `utils.py:load_haiku_file`); we read them with the safe unpickler of `nfnets_jax.checkpoints`.
    """
    if workdir_lib.is_url(path) or os.path.isdir(path):
        return read_workdir_params(path, use_ema=use_ema)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No weights at {path}: pass a workdir, our .npz, DeepMind's F*_haiku.npz"
                                " or timm's dm_nfnet_f*.safetensors.")
    if checkpoints.looks_like_safetensors(path) or checkpoints.looks_like_pytorch_checkpoint(path):
        return checkpoints.load_timm_nfnet(path)  # (refuses the latter: a pickle)
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    return checkpoints.load_npz(path) if is_zip else checkpoints.load_deepmind_params(path)


def _split(tree: Params, patterns: Sequence[str]) -> tuple[Params, Params]:
    """(kept, excluded): leaves whose `module/leaf` path matches any pattern are excluded."""
    compiled = [re.compile(p) for p in patterns]
    kept: Params = {}
    excluded: Params = {}
    for module, leaves in tree.items():
        for leaf, value in leaves.items():
            target = excluded if any(c.search(f"{module}/{leaf}") for c in compiled) else kept
            target.setdefault(module, {})[leaf] = value
    return kept, excluded


def check_pretrained_fits(loaded: Any, expected: Any, *, exclude: Sequence[str] = ()) -> None:
    """Raises `checkpoints.ParamsMismatchError` unless `loaded` fits `expected` outside `exclude`.

    `expected` may be abstract (`jax.eval_shape` of the model's init), so that wrong weights are
    refused when the experiment is built, before any parameter is initialised.
    """
    checkpoints.check_params_match(_split(loaded, exclude)[0], _split(expected, exclude)[0])


def merge_pretrained(loaded: Any, fresh: Any, *, exclude: Sequence[str] = ()) -> Params:
    """Fresh params for paths matching `exclude` (the new head), loaded params for the rest.

    Raises `checkpoints.ParamsMismatchError` listing every missing, unexpected or wrong-shaped
    parameter among those that are loaded, before any training starts.
    """
    check_pretrained_fits(loaded, fresh, exclude=exclude)
    loaded_kept, _ = _split(loaded, exclude)
    _, fresh_excluded = _split(fresh, exclude)
    merged: Params = {}
    for module, leaves in fresh.items():
        for leaf, value in leaves.items():
            source = fresh_excluded if leaf in fresh_excluded.get(module, {}) else loaded_kept
            merged.setdefault(module, {})[leaf] = np.asarray(source[module][leaf], dtype=value.dtype)
    return merged
