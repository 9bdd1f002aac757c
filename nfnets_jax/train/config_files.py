"""Config files, found and loaded the one way every program does it.

A config is a Python file with `get_config(arg=None)` (big_vision's convention): `configs/nfnet.py:F0`
calls `get_config("F0")`, `configs/digits.py` calls `get_config()`, as ml_collections' config flag
does. In a checkout the files are the top-level `configs/`; `pip install .` puts them inside the
package (`nfnets_jax/configs`), and `configs_folder` finds whichever is there, so a bare name
(`nfnet:F0`) works from any directory.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types

import ml_collections

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]


def configs_folder() -> pathlib.Path:
    """The folder of the project's config files: `nfnets_jax/configs` when installed, else the
    checkout's top-level `configs/`."""
    installed = _PACKAGE / "configs"
    return installed if (installed / "digits.py").is_file() else _PACKAGE.parent / "configs"


def config_path(spec: str) -> tuple[pathlib.Path, str | None]:
    """(file, argument) of `spec`: a path (`configs/nfnet.py:F0`, `/abs/my_config.py`) or a bare
    name of one of the project's configs (`nfnet:F0`, `digits`)."""
    path, separator, arg = str(spec).partition(":")
    file = pathlib.Path(path)
    if not path.endswith(".py") and os.sep not in path and "/" not in path:
        file = configs_folder() / f"{path}.py"
    return file, (arg if separator else None)


def load_module(file: str | os.PathLike) -> types.ModuleType:
    """A config file as a module (its `get_config` and any constants it defines, e.g. a grid).

    Raises:
      ValueError: no such file, or not a Python file (one line each).
    """
    file = pathlib.Path(file)
    if not file.is_file():
        raise ValueError(f"No config file {str(file)!r}; the configs are in {configs_folder()}, e.g. nfnet.py:F0.")
    if file.suffix != ".py":
        raise ValueError(f"{file}: a config is a Python file with get_config(arg=None).")
    module_spec = importlib.util.spec_from_file_location(f"nfnets_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of `spec` (see `config_path`): its file's `get_config(arg)`, or `get_config()`.

    Raises:
      ValueError: no such file, not a Python file, or no `get_config` in it (one line each).
    """
    file, arg = config_path(spec)
    module = load_module(file)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{file} defines no get_config(arg=None).")
    return module.get_config(arg) if arg is not None else module.get_config()
