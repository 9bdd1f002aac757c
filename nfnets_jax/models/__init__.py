"""The Normalizer-Free model zoo: NFNets, NF-ResNets, NF-RegNets and a BN-ResNet baseline.

    from nfnets_jax import models

    forward = models.make_forward("nfnet_f0", num_classes=1000)   # hk.transform_with_state
    # or, inside your own transform: models.create("nfnet_f0", num_classes=1000)(x, is_training)

Modules return logits; `model(x, is_training, return_features=True)` returns a dict with
`logits`, `pool`, `stem`, `stage_1`…`stage_4`, `block_outputs` and `branch_variances`.
"""

from nfnets_jax.models.registry import (
    abstract_init,
    count_macs,
    count_params,
    create,
    list_models,
    make_forward,
    stage_regexes,
    variant_info,
)

__all__ = ["abstract_init", "count_macs", "count_params", "create", "list_models", "make_forward",
           "stage_regexes", "variant_info"]
