"""Every notebook, run as it stands."""

import os
import pathlib
import re
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


# ---- What the stored notebooks show (python -m experiments.run_notebooks wrote them) ----

def _notebook(name):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


def _shown_text(notebook) -> str:
    """Everything a reader sees in the stored outputs: printed text and rendered markdown."""
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def _table_rows(text: str, header_start: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header starts with `header_start`: {first cell: other cells}."""
    lines = text[text.index(header_start):].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _mean_and_spread(cell: str) -> tuple[float, float]:
    mean, _, sd = cell.partition("±")
    return float(mean), float(sd)


def test_stored_notebooks_are_clean_and_name_the_commit_that_produced_them():
    for name in NOTEBOOKS:
        notebook = _notebook(name)
        run = notebook.metadata.get("nfnets_jax_run", {})
        assert re.fullmatch(r"[0-9a-f]{40}", (run.get("git") or {}).get("commit", "")), f"{name}: no commit"
        assert run["git"]["dirty"] is False, f"{name}: produced by uncommitted code"
        streams = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.output_type == "stream"]
        assert all(out.name == "stdout" for out in streams), f"{name}: stderr stored"
        assert not any(re.search(r"\d+%\||\r", out.text) for out in streams), f"{name}: progress bars stored"
        assert (ROOT / "notebooks" / f"{name}.ipynb").stat().st_size < 600_000, name


def test_stored_quickstart_shows_the_pretrained_model_classifying_real_images_and_its_accuracy():
    text = _shown_text(_notebook("quickstart"))
    measured = re.search(r"test top-1 ([\d.]+)% \(([\d,]+)/([\d,]+)\); card says ([\d.]+)%", text)
    assert measured, "no accuracy of the pretrained model in the stored outputs"
    accuracy, correct, total, card = measured.groups()
    assert int(total.replace(",", "")) == 10_000
    assert float(accuracy) == pytest.approx(100 * int(correct.replace(",", "")) / 10_000, abs=0.005)
    assert float(accuracy) > 90 and abs(float(accuracy) - float(card)) < 0.1
    assert "params identical: True, predictions identical: True" in text  # the timm/DeepMind round trip


def test_stored_optimizer_comparison_has_seeds_a_table_and_every_optimizer_above_chance():
    text = _shown_text(_notebook("optimizers"))
    rows = _table_rows(text, "| optimizer | test top-1")
    assert {"SGD + AGC (paper)", "AdamW", "Lion", "SAM, 20% ascent (paper)", "full SAM"} <= set(rows)
    for name, cells in rows.items():
        top1, spread = _mean_and_spread(cells[0])
        loss, _ = _mean_and_spread(cells[1])
        assert top1 > 0.5 and loss < 2.303 - 0.5, f"{name} is not clearly above chance: {cells}"
        assert "±" in cells[0], f"{name}: one seed only"
    second_table = text.index("| optimizer | test top-1", text.index("| optimizer | test top-1") + 1)
    agc_rows = _table_rows(text[second_table:], "| optimizer | test top-1")  # batch 1024, with and without AGC
    assert set(agc_rows) == {"SGD + AGC (λ=0.01)", "SGD, no AGC"}
    assert all("±" in cells[0] for cells in agc_rows.values())
    assert "**Conclusion.**" in text and "SAM's modified 20% ascent costs" in text


def test_stored_finetune_shows_fine_tuning_beat_scratch_on_every_seed():
    text = _shown_text(_notebook("finetune"))
    rows = _table_rows(text, "| digits, ")
    per_seed = {arm: [float(v) for v in cells[1].split(",")] for arm, cells in rows.items()}
    assert len(per_seed["full fine-tune"]) >= 2 and len(per_seed["from scratch"]) >= 2
    assert min(per_seed["full fine-tune"]) > max(per_seed["from scratch"])
    assert "linear probe" in per_seed


# ---- Colab-ready: the install cell, and nothing taken from a checkout ----

def _code_cells(name):
    return [cell.source for cell in _notebook(name).cells if cell.cell_type == "code"]


def test_each_notebook_opens_with_an_install_cell_that_skips_when_the_package_is_importable(monkeypatch, capsys):
    import subprocess as subprocess_module  # pylint: disable=import-outside-toplevel

    def no_install(*args, **kwargs):
        raise AssertionError(f"the install cell ran {args}")

    monkeypatch.setattr(subprocess_module, "run", no_install)
    for name in NOTEBOOKS:
        first = _code_cells(name)[0]
        assert "pip" in first and "install" in first and "PACKAGE_SOURCE" in first, f"{name}: no install cell first"
        exec(compile(first, f"{name}:install", "exec"), {})  # pylint: disable=exec-used
        assert "nfnets_jax:" in capsys.readouterr().out


def test_notebooks_take_nothing_from_a_checkout_and_need_no_test_extras():
    for name in NOTEBOOKS:
        source = "\n".join(_code_cells(name))
        for needle in ("ROOT", "sys.path", "import dill", "from experiments", "import experiments",
                       "spec_from_file_location", "pathlib.Path.cwd"):
            assert needle not in source, f"{name} uses {needle!r}, which needs a checkout"
        assert "config_files.load_config(" in source or "load_config" not in source, name


# ---- docs/notebooks.md quotes the stored notebooks, never figures of its own ----

def _docs_section(start: str, end: str | None = None) -> str:
    page = (ROOT / "docs" / "notebooks.md").read_text()
    section = page[page.index(start):]
    return section[:section.index(end)] if end else section


def test_the_docs_table_of_commits_and_wall_times_is_the_stored_metadata():
    table = _docs_section("| notebook | commit that produced the outputs |", "\n\n")
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    assert set(rows) == set(NOTEBOOKS)
    for name in NOTEBOOKS:
        run = _notebook(name).metadata["nfnets_jax_run"]
        commit, wall, load = rows[name]
        assert run["git"]["commit"].startswith(commit.strip("`")) and len(commit.strip("`")) >= 12, name
        assert wall == f"{run['wall_seconds']:.0f} s", name
        assert float(load) == run["load_average_at_end"][0], name


def test_every_figure_the_docs_say_the_notebooks_showed_is_in_their_stored_outputs():
    """A number typed into the page that no stored output shows is a number that drifted."""
    section = _docs_section("What they showed")
    shown = "\n".join(_shown_text(_notebook(name)) for name in NOTEBOOKS)
    sources = "\n".join(cell.source for name in NOTEBOOKS for cell in _notebook(name).cells)
    missing = [number for number in re.findall(r"\d[\d,]*(?:\.\d+)?", section)
               if not re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", shown + sources)]
    assert not missing, f"docs/notebooks.md quotes figures no stored notebook shows: {missing}"


def test_the_readme_names_the_commits_that_produced_the_stored_outputs():
    readme = (ROOT / "README.md").read_text()
    for name in NOTEBOOKS:
        commit = _notebook(name).metadata["nfnets_jax_run"]["git"]["commit"]
        assert f"`{commit[:12]}`" in readme, f"README does not name {name}'s commit {commit[:12]}"
