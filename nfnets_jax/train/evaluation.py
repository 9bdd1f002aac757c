"""Evaluation over one full pass of the eval split: top-1, top-5 and loss, raw and EMA params.

The per-device eval step returns sums over real examples (padding has `mask == 0`), psummed over
devices; here they are accumulated on device across batches and divided once at the end, so a
dataset size that does not divide by the batch gives exact numbers: every example counted once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import haiku as hk
import jax

from nfnets_jax.train.parallel import first_replica

EVAL_KEYS = ("images", "labels", "mask")


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
    totals = None
    for batch in batches:
        sums = eval_fn(params, model_state, put_batch({k: batch[k] for k in EVAL_KEYS}))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    if totals is None:
        raise ValueError("The eval split yielded no batches; check config.data.eval_split.")
    host = first_replica(totals)
    count = float(host["count"])
    if count <= 0:
        raise ValueError("The eval split has no examples; check config.data.eval_split.")
    return {
        "top_1_acc": float(host["top_1_correct"]) / count,
        "top_5_acc": float(host["top_5_correct"]) / count,
        "loss": float(host["loss_sum"]) / count,
        "num_examples": count,
    }


def evaluate_raw_and_ema(
    eval_fn: Callable,
    state: Any,
    make_batches: Callable[[], Iterable[Mapping[str, Any]]],
    put_batch: Callable[[Any], Any],
) -> dict[str, float]:
    """Evaluates the raw params and, when present, the EMA params (keys prefixed `ema_`).

    The official experiment reports both (official_nfnets.md §4.4); results are usually quoted
    for the EMA weights.
    """
    results = evaluate(eval_fn, state.params, state.model_state, make_batches(), put_batch)
    if state.ema_params is not None:
        ema = evaluate(eval_fn, state.ema_params, state.model_state, make_batches(), put_batch)
        results.update({f"ema_{name}": value for name, value in ema.items() if name != "num_examples"})
    return results
