"""Prints the README's model-zoo table (markdown), computed from the code, not typed by hand.

    python -m experiments.model_table            # every registered model
    python -m experiments.model_table nfnet_f0 nf_regnet_b0

For each model: parameters with 1000 classes, and multiply-accumulates of convs and linears for
one image at the test resolution (what the paper's Table 3 calls #FLOPs), plus the train/test
resolutions of its recipe. Each model is traced once, abstractly (`jax.make_jaxpr` of its
`init`), so nothing is computed; the whole zoo takes about a minute on a 2-core CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nfnets_jax.models import registry


def model_row(name: str) -> str:
    """One markdown row: name, params (1000 classes), MACs at the test resolution, train/test px."""
    info = registry.variant_info(name)
    macs, params = registry.macs_and_params(name, info["test_imsize"])
    return (
        f"| `{name}` | {params / 1e6:.2f}M | {macs / 1e9:.2f}B "
        f"| {info['train_imsize']} | {info['test_imsize']} |"
    )


def markdown_table(names: Sequence[str]) -> str:
    """The zoo table for `names`, header included."""
    header = "| Model | Params | MACs @ test px | Train px | Test px |\n|---|---|---|---|---|"
    return "\n".join([header] + [model_row(name) for name in names])


def main(argv: Sequence[str]) -> None:
    names = list(argv) or registry.list_models()
    print(markdown_table(names))


if __name__ == "__main__":
    main(sys.argv[1:])
