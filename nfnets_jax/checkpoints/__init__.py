"""Parameter files: DeepMind's released weights (loaded safely) and our own plain `.npz`.

- `deepmind_pickle`: `load_deepmind_params` reads the released dill pickles with a restricted
  unpickler that runs no code from the file (`UnsafeCheckpointError` otherwise);
  `allowlist`: the few globals such a file may name, each re-implemented safely.
- `param_tree`: '/'-joined param names and `check_params_match` against a model's tree.
- `npz_format`: `save_npz` / `load_npz`, pickle-free and exact (bfloat16 included).
- `download`: atomic download with sha256 verification.
- `released`: `RELEASED_WEIGHTS`, `detect_nfnet_variant`, `fetch_released_params`.
"""

from nfnets_jax.checkpoints.allowlist import allowed_globals
from nfnets_jax.checkpoints.deepmind_pickle import UnsafeCheckpointError, load_deepmind_params
from nfnets_jax.checkpoints.download import ChecksumMismatchError, download, sha256_of_file
from nfnets_jax.checkpoints.npz_format import load_npz, save_npz
from nfnets_jax.checkpoints.param_tree import (
    Params,
    ParamsMismatchError,
    check_params_match,
    flatten_params,
    unflatten_params,
)
from nfnets_jax.checkpoints.released import (
    RELEASED_BASE_URL,
    RELEASED_WEIGHTS,
    ReleasedWeights,
    detect_nfnet_variant,
    fetch_released_params,
)

__all__ = [
    "ChecksumMismatchError",
    "Params",
    "ParamsMismatchError",
    "RELEASED_BASE_URL",
    "RELEASED_WEIGHTS",
    "ReleasedWeights",
    "UnsafeCheckpointError",
    "allowed_globals",
    "check_params_match",
    "detect_nfnet_variant",
    "download",
    "fetch_released_params",
    "flatten_params",
    "load_deepmind_params",
    "load_npz",
    "save_npz",
    "sha256_of_file",
    "unflatten_params",
]
