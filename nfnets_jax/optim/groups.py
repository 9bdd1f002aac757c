"""Parameter groups as data: regular expressions over Haiku parameter paths.

The official optimiser (`experiment_nfnets.py:Experiment._make_opt`)
treats three groups differently: gains and biases get no weight decay, the classifier weight
gets no AGC, everything else gets both. We express those groups as lists of regular
expressions in the config (big_vision style) and turn them into `optax.masked` masks here, so
a reader can see and change them without reading a loop.

A parameter's *path* is Haiku's `f"{module_name}/{leaf_name}"`, e.g. `NFNet/~/linear/w` or
`NFNet/~/nf_block_3/squeeze_excite/~/linear/w`. Patterns are matched with `re.search`, so
anchor them (`^...$`) when a substring match is too loose.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

# Haiku nests params as {module_name: {leaf_name: array}}; other pytrees (lists, NamedTuples)
# get their index / attribute name as a path segment.
PyTree = Any


def path_string(key_path: Sequence[Any]) -> str:
    """Joins a `jax.tree_util` key path into Haiku's `module/leaf` form."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """All leaves of `tree` with their `module/leaf` paths, in tree order."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_string(key_path), leaf) for key_path, leaf in with_paths]


def compile_patterns(patterns: Iterable[str] | None, what: str) -> list[re.Pattern[str]]:
    """Compiles a list of regexes, failing early with the offending pattern named.

    Args:
      patterns: regular expressions (None means the empty list).
      what: the config field the patterns come from, for the error message.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise ValueError(
            f"{what} must be a list of regular expressions, got the single string "
            f"{patterns!r}; wrap it in a list: [{patterns!r}]."
        )
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{what} must contain strings, got {pattern!r}.")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{what}: the regular expression {pattern!r} does not compile: {err}.") from err
    return compiled


def matches_any(path: str, compiled: Sequence[re.Pattern[str]]) -> bool:
    """True if any pattern is found (`re.search`) in `path`."""
    return any(pattern.search(path) for pattern in compiled)


def exclusion_mask(patterns: Iterable[str] | None, what: str = "exclude") -> Callable[[PyTree], PyTree]:
    """A mask function for `optax.masked`: True where a path matches none of `patterns`.

    The patterns are compiled now, so a bad regex fails when the optimiser is built, not at
    the first step. The returned function is pure (no warnings), because optax calls it at
    every `init` and `update` trace; unmatched patterns are reported by
    `unmatched_patterns` / `describe_param_groups` instead.
    """
    compiled = compile_patterns(patterns, what)

    def mask_fn(tree: PyTree) -> PyTree:
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        flags = [not matches_any(path_string(key_path), compiled) for key_path, _ in with_paths]
        return jax.tree_util.tree_unflatten(treedef, flags)

    return mask_fn


def unmatched_patterns(patterns: Iterable[str] | None, params: PyTree, what: str = "exclude") -> list[str]:
    """The patterns in `patterns` that match no parameter path of `params`.

    An exclusion that matches nothing is usually a typo or a model whose module names differ
    from the default (e.g. a classifier not called `linear`); we warn rather than fail,
    because one config is shared across model families.
    """
    paths = [path for path, _ in named_leaves(params)]
    return [
        pattern.pattern
        for pattern in compile_patterns(patterns, what)
        if not any(pattern.search(path) for path in paths)
    ]


def group_membership(groups: Mapping[str, str], paths: Iterable[str]) -> dict[str, list[str]]:
    """For each label of `groups` (label -> regex), the paths its regex matches."""
    compiled = {label: compile_patterns([regex], f"group {label!r}")[0] for label, regex in groups.items()}
    paths = list(paths)
    return {label: [path for path in paths if pattern.search(path)] for label, pattern in compiled.items()}


def warn_unmatched(patterns: Iterable[str] | None, params: PyTree, what: str) -> list[str]:
    """Emits one `UserWarning` per pattern of `what` that matches no parameter."""
    unmatched = unmatched_patterns(patterns, params, what)
    for pattern in unmatched:
        warnings.warn(
            f"{what}: the pattern {pattern!r} matches no parameter path; check it against the "
            "paths printed by describe_param_groups (a typo, or a model with other module names?).",
            UserWarning,
            stacklevel=3,
        )
    return unmatched
