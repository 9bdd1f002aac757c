"""Weight files: DeepMind's released weights (loaded safely), timm's, and our own plain `.npz`.

A run's own checkpoints (orbax, the whole train state) are not weight files: they live with the
runner, `nfnets_jax.train.checkpointing`, which reads these files too when a run starts from them.

- `weight_file`: `read_weight_file`, any of the formats below, told apart by the file's bytes.
- `deepmind_pickle`: `load_deepmind_params` reads the released dill pickles with a restricted
  unpickler that runs no code from the file (`UnsafeCheckpointError` otherwise);
  `allowlist`: the few globals such a file may name, each re-implemented safely.
- `param_tree`: '/'-joined param names, `check_params_match` against a model's tree (the one
  comparison of stored arrays with a model's, `differences`), and the fine-tuning merge
  (`check_pretrained_fits`, `merge_pretrained`).
- `npz_format`: `save_npz` / `load_npz`, pickle-free and exact (bfloat16 included).
- `download`: atomic download with sha256 verification (`atomic_write`: every file written whole).
- `pretrained`: `load_pretrained(name)`, models trained by this project and shipped in the package
  (`PRETRAINED_MODELS`; each a `.npz` and its card, a `PretrainedModel`).
- `released`: `RELEASED_WEIGHTS`, `detect_nfnet_variant`, `fetch_released_params`.
- `safetensors_format`: `read_safetensors` / `write_safetensors`, a NumPy-only reader that validates the whole header
  against the file before allocating anything (`SafetensorsFormatError` otherwise).
- `timm_nfnet`: `load_timm_nfnet` / `convert_timm_nfnet`, timm's `dm_nfnet_f0`…`f6` weights
  mapped onto our NFNet by an explicit name table (`TimmWeightsError` lists every mismatch);
  `match_timm_standardization` to reproduce timm's outputs rather than DeepMind's;
  `to_timm_state_dict`, the inverse, to hand our params to timm.
"""

from nfnets_jax.weights.allowlist import allowed_globals
from nfnets_jax.weights.deepmind_pickle import UnsafeCheckpointError, load_deepmind_params
from nfnets_jax.weights.download import ChecksumMismatchError, download, sha256_of_file
from nfnets_jax.weights.npz_format import load_npz, save_npz
from nfnets_jax.weights.param_tree import (
    Params,
    ParamsMismatchError,
    check_params_match,
    check_pretrained_fits,
    differences,
    flatten_params,
    merge_pretrained,
    unflatten_params,
)
from nfnets_jax.weights.pretrained import (
    PRETRAINED_MODELS,
    PretrainedModel,
    load_pretrained,
    pretrained_model,
)
from nfnets_jax.weights.released import (
    RELEASED_BASE_URL,
    RELEASED_WEIGHTS,
    ReleasedWeights,
    detect_nfnet_variant,
    fetch_released_params,
)
from nfnets_jax.weights.safetensors_format import (
    SafetensorsFormatError,
    looks_like_safetensors,
    read_safetensors,
    write_safetensors,
)
from nfnets_jax.weights.timm_nfnet import (
    TIMM_NFNET_MODELS,
    TimmWeightsError,
    convert_timm_nfnet,
    load_timm_nfnet,
    looks_like_pytorch_checkpoint,
    match_timm_standardization,
    to_timm_state_dict,
)
from nfnets_jax.weights.weight_file import read_weight_file

__all__ = [
    "ChecksumMismatchError",
    "PRETRAINED_MODELS",
    "Params",
    "ParamsMismatchError",
    "PretrainedModel",
    "RELEASED_BASE_URL",
    "RELEASED_WEIGHTS",
    "ReleasedWeights",
    "SafetensorsFormatError",
    "TIMM_NFNET_MODELS",
    "TimmWeightsError",
    "UnsafeCheckpointError",
    "allowed_globals",
    "check_params_match",
    "check_pretrained_fits",
    "convert_timm_nfnet",
    "detect_nfnet_variant",
    "differences",
    "download",
    "fetch_released_params",
    "flatten_params",
    "load_deepmind_params",
    "load_npz",
    "load_pretrained",
    "load_timm_nfnet",
    "looks_like_pytorch_checkpoint",
    "looks_like_safetensors",
    "match_timm_standardization",
    "merge_pretrained",
    "pretrained_model",
    "read_safetensors",
    "read_weight_file",
    "save_npz",
    "sha256_of_file",
    "to_timm_state_dict",
    "unflatten_params",
    "write_safetensors",
]
