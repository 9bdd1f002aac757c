"""The classifier as the runner sees it: `hk.transform_with_state` of `(images, is_training)`.

One place where `config.model.name` and `config.model.kwargs` reach the model registry, shared by
training and evaluation so that both build exactly the same parameter tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax import models


def make_forward(model_name: str, num_classes: int, kwargs: Mapping[str, Any] | None = None) -> hk.TransformedWithState:
    """`forward.apply(params, state, rng, images, is_training=...) -> (logits, state)`.

    Raises ValueError (listing the valid names) for an unknown `model_name`, at once rather than
    at the first trace.
    """
    if model_name not in models.list_models():
        raise ValueError(f"Unknown model {model_name!r}; choose one of {models.list_models()}.")
    kwargs = dict(kwargs or {})

    def forward(images, is_training: bool):
        return models.create(model_name, num_classes, **kwargs)(images, is_training=is_training)

    return hk.transform_with_state(forward)


def abstract_init(forward: hk.TransformedWithState, image_size: int) -> tuple[Any, Any]:
    """(params, state) of `forward.init` as `jax.ShapeDtypeStruct` trees, nothing computed: for
    checking loaded weights against the model before anything is initialised."""
    return jax.eval_shape(lambda: forward.init(
        jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)), is_training=True))
