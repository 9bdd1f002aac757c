"""Input pipelines for NFNets (docs/recipe.md): sources, preprocessing, augmentation,
per-process sharding and per-device batching, and device feeding.

Public entry points (docs/CONTRACTS.md, data section): `pipeline.dataset_info`,
`pipeline.make_train_iterator`, `pipeline.make_eval_iterator`, the `feeding` placements and
`config.default_data_config`.
"""

from nfnets_jax.data.config import default_data_config, digits_data_config, validate_data_config
from nfnets_jax.data.feeding import prefetch_to_device, put_for_pmap, put_for_shard_map
from nfnets_jax.data.pipeline import (DatasetInfo, batch_layout, dataset_info, make_eval_iterator,
                                      make_train_iterator)
from nfnets_jax.data.sources import DatasetUnavailableError

__all__ = [
    "DatasetInfo", "DatasetUnavailableError", "batch_layout", "dataset_info",
    "default_data_config", "digits_data_config", "make_eval_iterator", "make_train_iterator",
    "prefetch_to_device", "put_for_pmap", "put_for_shard_map", "validate_data_config",
]
