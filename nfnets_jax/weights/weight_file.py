"""One entry point for a weight file of any format this package reads, told apart by its bytes.

DeepMind's released `F*_haiku.npz` files are dill pickles, not zip archives despite their name
(official `utils.py:load_haiku_file`), read with the safe unpickler of `deepmind_pickle`; our own
`.npz` is a zip archive (`npz_format`); timm's `dm_nfnet_f*` weights are `.safetensors`
(`timm_nfnet`, which refuses PyTorch's pickled `.pth` files).
"""

from __future__ import annotations

import os

from nfnets_jax.weights.deepmind_pickle import load_deepmind_params
from nfnets_jax.weights.npz_format import load_npz
from nfnets_jax.weights.param_tree import Params, check_numbers
from nfnets_jax.weights.safetensors_format import looks_like_safetensors
from nfnets_jax.weights.timm_nfnet import load_timm_nfnet, looks_like_pytorch_checkpoint

_ZIP_MAGIC = b"PK\x03\x04"


def read_weight_file(path: str) -> Params:
    """Haiku params from our `.npz`, DeepMind's pickle `.npz`, or timm's `dm_nfnet_f*` `.safetensors`
    (converted to our names).

    Raises:
      FileNotFoundError: no file at `path`.
      UnsafeCheckpointError, SafetensorsFormatError, TimmWeightsError, ValueError: a file that is
        not a weight file this package reads safely, or holds anything but finite numbers
        (`param_tree.check_numbers`), each naming what is wrong.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No weights at {path}: pass a workdir, our .npz, DeepMind's F*_haiku.npz"
                                " or timm's dm_nfnet_f*.safetensors.")
    if looks_like_safetensors(path) or looks_like_pytorch_checkpoint(path):
        params = load_timm_nfnet(path)  # (refuses the latter: a pickle)
    else:
        with open(path, "rb") as f:
            is_zip = f.read(4) == _ZIP_MAGIC
        params = load_npz(path) if is_zip else load_deepmind_params(path)
    check_numbers(params, path)
    return params
