"""Console entry points of an installed nfnets-jax: `nfnets-train` and `nfnets-eval`.

They run the same programs as `python3 -m experiments.train` / `python3 -m experiments.eval` in a
checkout. An installed copy keeps `experiments/` and `configs/` under the package, as
`nfnets_jax.experiments` and `nfnets_jax.configs` (setup.py's package_dir), so that nothing but
`nfnets_jax` lands at the top level of site-packages, and the default config (the offline demo,
`configs/digits.py`) is found beside the code in both layouts.
"""

from __future__ import annotations

import importlib
import pathlib
from types import ModuleType


def _program(name: str) -> ModuleType:
    """`nfnets_jax.experiments.<name>` when installed, `experiments.<name>` in a bare checkout."""
    try:
        return importlib.import_module(f"nfnets_jax.experiments.{name}")
    except ModuleNotFoundError as error:
        if error.name not in ("nfnets_jax.experiments", f"nfnets_jax.experiments.{name}"):
            raise
        return importlib.import_module(f"experiments.{name}")


def configs_dir() -> pathlib.Path:
    """The directory of the shipped experiment configs (`configs/*.py`), installed or not."""
    return pathlib.Path(_program("train").DEFAULT_CONFIG).parent


def train() -> None:
    """`nfnets-train [--config=...] [--workdir=...]`: experiments/train.py's command line."""
    _run(_program("train"))


def evaluate() -> None:
    """`nfnets-eval [...]`: experiments/eval.py's command line."""
    _run(_program("eval"))


def _run(program: ModuleType) -> None:
    """`app.run` with the program's own flag parser, which turns every mistake a user can type
    into one line (experiments/command_line.py), exactly as `python3 -m experiments.<name>`."""
    from absl import app  # pylint: disable=import-outside-toplevel

    app.run(program.main, flags_parser=program.parse_flags)
