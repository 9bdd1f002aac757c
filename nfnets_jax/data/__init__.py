"""Input pipelines for NFNets (docs/recipe.md): sources, preprocessing, augmentation,
per-process sharding and per-device batching, and device feeding.

Public entry points (docs/CONTRACTS.md, data section): `pipeline.dataset_info`,
`pipeline.make_train_iterator`, `pipeline.make_eval_iterator`, the `feeding` placements and
`config.default_data_config`.

Only `pipeline` and `sources` need TensorFlow. The names below are resolved on first use
(PEP 562), so that the config schema, the device feeding and the train step, which import
`nfnets_jax.data.config` or `.feeding`, run on a GPU or TPU box that has JAX but no TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME_OF = {
    "default_data_config": "config", "digits_data_config": "config", "validate_data_config": "config",
    "fashion_mnist_data_config": "config",
    "prefetch_to_device": "feeding", "put_for_pmap": "feeding", "put_for_shard_map": "feeding",
    "DatasetInfo": "pipeline", "batch_layout": "pipeline", "dataset_info": "pipeline",
    "make_eval_iterator": "pipeline", "make_train_iterator": "pipeline",
    "DatasetUnavailableError": "sources",
}

__all__ = sorted(_HOME_OF)


_SUBMODULES = ("config", "feeding", "mixing", "pipeline", "preprocess", "randaugment", "sources")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _HOME_OF:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME_OF[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME_OF) | set(_SUBMODULES))
