"""Evaluation over one full pass of the eval split: top-1, top-5 and loss, raw and EMA params.

The per-device eval step returns sums over real examples (padding has `mask == 0`), psummed over
devices; here they are accumulated on host across batches and divided once at the end, so a
dataset size that does not divide by the batch gives exact numbers: every example counted once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import haiku as hk
import jax
import numpy as np

from nfnets_jax.train.parallel import first_replica

EVAL_KEYS = ("images", "labels", "mask")


def _accumulate(eval_fn, trees: Mapping[str, tuple[hk.Params, hk.State]], batches, put_batch):
    """Sums of every tree's eval step over one pass of `batches` (each batch placed once).

    Each batch's sums (a few scalars, already psummed over devices) are copied to host from the
    first replica and added there in float64: no XLA program is dispatched per batch. The eager
    device-side `+` on pmap-sharded outputs that this replaces is where a pytest worker aborted
    (no message survived) in 2 of 3 full test runs under load (jaxlib 0.10.2, CPU).
    """
    totals: dict[str, Any] = {}
    for batch in batches:
        placed = put_batch({k: batch[k] for k in EVAL_KEYS})
        for name, (params, model_state) in trees.items():
            sums = first_replica(eval_fn(params, model_state, placed))
            sums = {key: np.asarray(value, np.float64) for key, value in sums.items()}
            totals[name] = sums if name not in totals else {key: totals[name][key] + value
                                                             for key, value in sums.items()}
    if not totals:
        raise ValueError("The eval split yielded no batches; check config.data.eval_split.")
    return totals


def _finish(host: Mapping[str, Any]) -> dict[str, float]:
    count = float(host["count"])
    if count <= 0:
        raise ValueError("The eval split has no examples; check config.data.eval_split.")
    return {
        "top_1_acc": float(host["top_1_correct"]) / count,
        "top_5_acc": float(host["top_5_correct"]) / count,
        "loss": float(host["loss_sum"]) / count,
        "num_examples": count,
    }


def evaluate(
    eval_fn: Callable[[hk.Params, hk.State, Any], Mapping[str, jax.Array]],
    params: hk.Params,
    model_state: hk.State,
    batches: Iterable[Mapping[str, Any]],
    put_batch: Callable[[Any], Any],
) -> dict[str, float]:
    """Returns `top_1_acc`, `top_5_acc`, `loss` and `num_examples` over `batches`.

    Args:
      eval_fn: a backend-wrapped `nfnets_jax.train.step.make_eval_step` function.
      params, model_state: replicated arrays to evaluate.
      batches: host batches `[local_devices, B, ...]` with `images`, `labels` and `mask`.
      put_batch: the backend's host-to-device placement.
    """
    return _finish(_accumulate(eval_fn, {"": (params, model_state)}, batches, put_batch)[""])


def evaluate_trees(
    eval_fn: Callable,
    trees: Mapping[str, tuple[hk.Params, hk.State]],
    batches: Iterable[Mapping[str, Any]],
    put_batch: Callable[[Any], Any],
) -> dict[str, dict[str, float]]:
    """`evaluate` for several `name -> (params, model_state)` in one pass over `batches`."""
    return {name: _finish(sums) for name, sums in _accumulate(eval_fn, trees, batches, put_batch).items()}


def evaluate_raw_and_ema(
    eval_fn: Callable,
    state: Any,
    make_batches: Callable[[], Iterable[Mapping[str, Any]]],
    put_batch: Callable[[Any], Any],
) -> dict[str, float]:
    """Evaluates the raw params and, when present, the EMA params (keys prefixed `ema_`).

    The official experiment reports both (official `Experiment.evaluate`); results are usually quoted
    for the EMA weights. One pass over the eval split serves both: each batch is read,
    preprocessed and placed once.
    """
    trees = {"": (state.params, state.model_state)}
    if state.ema_params is not None:
        trees["ema_"] = (state.ema_params, state.model_state)
    by_tree = evaluate_trees(eval_fn, trees, make_batches(), put_batch)
    results = by_tree[""]
    if "ema_" in by_tree:
        results.update({f"ema_{name}": value for name, value in by_tree["ema_"].items()
                        if name != "num_examples"})
    return results
