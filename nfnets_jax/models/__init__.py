"""The Normalizer-Free model zoo: NFNets, NF-ResNets, NF-RegNets and a BN-ResNet baseline.

    import haiku as hk
    from nfnets_jax import models

    forward = hk.transform_with_state(
        lambda x, train: models.create("nfnet_f0", num_classes=1000)(x, is_training=train))

Modules return logits; `model(x, is_training, return_features=True)` returns a dict with
`logits`, `pool`, `stem`, `stage_1`…`stage_4`, `block_outputs` and `branch_variances`.
"""

from nfnets_jax.models.registry import (
    count_macs,
    count_params,
    create,
    list_models,
    stage_regexes,
    variant_info,
)

__all__ = ["count_macs", "count_params", "create", "list_models", "stage_regexes", "variant_info"]
