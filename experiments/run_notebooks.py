"""Executes the notebooks in notebooks/ top to bottom and stores their outputs in place.

    python -m experiments.run_notebooks                   # all three, full size; rewrites the .ipynb files
    python -m experiments.run_notebooks optimizers        # one of them
    python -m experiments.run_notebooks --smoke           # tiny sizes (NFNETS_NOTEBOOK_SMOKE=1), nothing saved
    python -m nfnets_jax.experiments.run_notebooks --smoke --notebook_dir=DIR   # installed, no checkout

The kernel runs in the notebooks' folder with this checkout on its PYTHONPATH (installed, outside a
checkout, it imports the installed package, as on Colab), on the default JAX devices
(a forced fake-device count in XLA_FLAGS, as the test suite sets, is dropped: the notebooks are
single-device). Any error in any cell fails the command with the cell's traceback; the notebooks
assert what they show (a failed claim is an error), in smoke mode too where it holds at tiny sizes.

Saved notebooks keep what a reader needs: stderr streams (warnings) and progress-bar lines are dropped,
and the notebook's metadata records the commit, versions and machine that produced the outputs
(`nfnets_jax_run`), as README says.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import time
from collections.abc import Sequence

from absl import flags as absl_flags

from . import command_line

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("quickstart", "optimizers", "finetune")
SMOKE_VARIABLE = "NFNETS_NOTEBOOK_SMOKE"
FLAGS = absl_flags.FlagValues()  # this program's own (command_line.parse_flags says why)
absl_flags.DEFINE_bool("smoke", False, f"Tiny sizes ({SMOKE_VARIABLE}=1); outputs are not saved.", flag_values=FLAGS)
absl_flags.DEFINE_string("notebook_dir", None, "Folder of the .ipynb files (default: the checkout's notebooks/).",
                         flag_values=FLAGS)


def in_checkout() -> bool:
    """True when this file is the checkout's experiments/, not the installed nfnets_jax/experiments/."""
    return (REPO_ROOT / "setup.py").is_file()


def kernel_environment(smoke: bool) -> dict[str, str]:
    """The environment of the notebook kernel: this checkout importable (if there is one), single
    device, smoke flag."""
    env = dict(os.environ)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    if in_checkout():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    if smoke:
        env[SMOKE_VARIABLE] = "1"
    else:
        env.pop(SMOKE_VARIABLE, None)
    return env


def execute(name: str, *, smoke: bool, save: bool, timeout_s: int = 1800,
            notebook_dir: str | os.PathLike = NOTEBOOK_DIR, git: dict | None = None) -> float:
    """Runs <notebook_dir>/<name>.ipynb in a fresh kernel; returns the wall time in seconds.

    `git`: the checkout's state before the first notebook was saved (saving one makes the tree
    differ from its commit, which is not what produced the next one's outputs)."""
    # pylint: disable=import-outside-toplevel
    import nbformat
    from nbclient import NotebookClient

    path = pathlib.Path(notebook_dir) / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute(env=kernel_environment(smoke))
    seconds = time.perf_counter() - start
    if save:
        clean_outputs(notebook)
        notebook.metadata[RUN_METADATA_KEY] = run_metadata(seconds, git)
        nbformat.write(notebook, path)
    return seconds


RUN_METADATA_KEY = "nfnets_jax_run"


def clean_outputs(notebook) -> None:
    """Drops per-run execution timestamps, stderr streams (library warnings) and the runner's
    progress bars and per-step notices from stdout (a terminal's carriage-return redraws, which a
    stored notebook would keep as hundreds of lines)."""
    for cell in notebook.cells:
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            if out.output_type == "stream":
                if out.get("name") == "stderr":
                    continue
                out.text = readable_text(out.text)
                if not out.text:
                    continue
            kept.append(out)
        cell.outputs = kept


# Progress bars, the compile notice, and the per-step notice of a skipped non-finite update (the
# run's summary counts those: `skipped_steps`).
_PROGRESS = re.compile(r"\d+%\||First step \(compilation included\)|: update skipped\.$")


def readable_text(text: str) -> str:
    """`text` as a terminal would show it at the end (each line after its last carriage return),
    without progress-bar lines and blank runs."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    lines = [line for line in lines if line and not _PROGRESS.search(line)]
    return "\n".join(lines) + "\n" if lines else ""


def run_metadata(seconds: float, git: dict | None) -> dict:
    """What produced the stored outputs: the commit (and whether the tree had uncommitted changes
    when the command started), the package versions, the machine, and the notebook's wall time with
    the machine's 1/5/15-minute load averages when it ended (other jobs slow a shared machine)."""
    from nfnets_jax.runtime import provenance  # pylint: disable=import-outside-toplevel

    return {"git": git, "versions": provenance.package_versions(),
            "machine": provenance.machine(), "wall_seconds": round(seconds),
            "load_average_at_end": [round(load, 2) for load in os.getloadavg()]}


def main(argv: Sequence[str] | None = None) -> None:
    names = command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                                     multihost=False)[1:]
    unknown = sorted(set(names) - set(NOTEBOOKS))
    if unknown:
        command_line.fail(f"no notebook named {unknown}; choose from {NOTEBOOKS}")
    notebook_dir = pathlib.Path(FLAGS.notebook_dir or NOTEBOOK_DIR)
    missing = [name for name in names or NOTEBOOKS if not (notebook_dir / f"{name}.ipynb").is_file()]
    if missing:
        command_line.fail(f"no {', '.join(f'{name}.ipynb' for name in missing)} in {notebook_dir}"
                          + ("" if in_checkout() else ": outside a checkout, pass --notebook_dir"))
    from nfnets_jax.runtime import provenance  # pylint: disable=import-outside-toplevel

    git = provenance.git_state()  # before any notebook is rewritten
    for name in names or NOTEBOOKS:
        seconds = execute(name, smoke=FLAGS.smoke, save=not FLAGS.smoke, notebook_dir=notebook_dir, git=git)
        print(f"{name}: {seconds:.0f}s{'' if FLAGS.smoke else ', outputs saved'}", flush=True)


if __name__ == "__main__":
    main()
