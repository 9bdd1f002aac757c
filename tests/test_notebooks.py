"""Every notebook, run as it stands."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ("quickstart", "optimizers", "finetune")


@pytest.mark.slow
def test_every_notebook_executes_top_to_bottom():
    """`python -m experiments.run_notebooks --smoke`: each notebook in a fresh kernel, tiny sizes."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for name in NOTEBOOKS:
        assert (ROOT / "notebooks" / f"{name}.ipynb").exists(), name
    result = subprocess.run([sys.executable, "-m", "experiments.run_notebooks", "--smoke"], cwd=ROOT,
                            env=dict(os.environ), capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for name in NOTEBOOKS:
        assert f"{name}:" in result.stdout


def test_stored_notebooks_have_outputs_and_plots():
    """The committed notebooks were executed (python -m experiments.run_notebooks) with their plots."""
    nbformat = pytest.importorskip("nbformat")
    for name in NOTEBOOKS:
        notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.execution_count for cell in code_cells), f"{name}: not executed top to bottom"
        errors = [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
        assert not errors, f"{name}: stored outputs contain an error"
        images = [out for cell in code_cells for out in cell.outputs if "image/png" in out.get("data", {})]
        assert images, f"{name}: no plot in the stored outputs"


def test_writing_the_curves_png_leaves_the_notebook_plot_backend_alone(tmp_path):
    """Regression: each run's curves PNG switched pyplot to Agg, so a notebook that trained
    showed no inline plot afterwards."""
    import json  # pylint: disable=import-outside-toplevel

    import matplotlib  # pylint: disable=import-outside-toplevel

    from nfnets_jax.train import metrics_logging  # pylint: disable=import-outside-toplevel

    matplotlib.use("svg")  # stands for the inline backend a notebook uses
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (1, 2, 3)))
    png = metrics_logging.plot_training_curves(str(path), str(tmp_path / "curves.png"))
    assert matplotlib.get_backend() == "svg"
    assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
