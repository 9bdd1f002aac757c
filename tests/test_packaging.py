"""A non-editable install works outside the checkout: README's "Outside a checkout" promise.

`pip install .` into a temporary venv, then the console scripts run the offline demo (shortened
to three steps) and its evaluation from a directory that is not the checkout, with nothing of the
checkout on the import path.

The wheel is built by the test's own environment (which has the build tools the lock pins), and
installed --no-deps --no-index into a venv made from the bare interpreter; that venv reaches the
test environment's dependencies through a path file naming its site directories. `venv
--system-site-packages` would not do: made from inside a user's venv it exposes the *base*
interpreter's packages, not the venv's, and the install then fails or, worse, passes only on a
machine whose system interpreter happens to hold everything (the CI machine once did). Nothing
is downloaded, and the test costs seconds of pip instead of minutes of copying jax and TensorFlow.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--config.train.steps=3", "--config.optimizer.warmup_epochs=0", "--config.log.every_steps=1"]


def _clean_env() -> dict[str, str]:
    """This environment without the checkout on PYTHONPATH (tests/conftest.py puts it there)."""
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    return env


def _site_directories_of_this_environment() -> list[str]:
    """The site directories this interpreter imports its packages from (a venv's own, and the base
    interpreter's when the venv was made with --system-site-packages), never the checkout."""
    import site  # pylint: disable=import-outside-toplevel

    directories = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        directories.append(site.getusersitepackages())
    return [d for d in directories if os.path.isdir(d) and not pathlib.Path(d).is_relative_to(REPO)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin dir, a run directory outside the checkout) after installing the wheel."""
    root = tmp_path_factory.mktemp("install")
    # Build from a copy, so that the build leaves no build/ or *.egg-info in the checkout.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "workdirs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "*venv*"))
    wheels = root / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(wheels), str(source)],
        cwd=root, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("nfnets_jax-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # bare: no system site
    python = venv / "bin" / "python"
    # Plain directory lines: the dependencies become importable, while the test environment's
    # own path hooks (its editable install of this checkout among them) are not run.
    (_site_packages(python) / "test_environment.pth").write_text(
        "\n".join(_site_directories_of_this_environment()) + "\n")
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        cwd=root, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = root / "elsewhere"
    run_dir.mkdir()
    return python, venv / "bin", run_dir


def _site_packages(python: pathlib.Path) -> pathlib.Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return pathlib.Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                                       check=True).stdout.strip())


@pytest.mark.slow
def test_install_adds_one_top_level_package_with_configs_and_programs_inside(installed):
    python, _, run_dir = installed
    site = _site_packages(python)
    assert (site / "nfnets_jax" / "configs" / "digits.py").is_file()
    assert (site / "nfnets_jax" / "experiments" / "train.py").is_file()
    for stray in ("experiments", "configs", "benchmarks", "tests"):
        assert not (site / stray).exists(), f"{stray}/ installed as a top-level package"
    for name in ("nfnet_fashion_mnist.npz", "nfnet_fashion_mnist.json"):  # the shipped pretrained model
        assert (site / "nfnets_jax" / "weights" / "files" / name).is_file(), name
    code = "import nfnets_jax, nfnets_jax.experiments.train as t; print(nfnets_jax.__file__); print(t.DEFAULT_CONFIG)"
    out = subprocess.run([str(python), "-c", code], cwd=run_dir, env=_clean_env(), capture_output=True,
                         text=True, check=True).stdout.split()
    assert pathlib.Path(out[0]).is_relative_to(site) and pathlib.Path(out[1]).is_file()


@pytest.mark.slow
def test_console_scripts_train_and_evaluate_the_demo_outside_the_checkout(installed):
    python, bin_dir, run_dir = installed
    site = _site_packages(python)
    train = subprocess.run([str(bin_dir / "nfnets-train"), *SHORT], cwd=run_dir, env=_clean_env(),
                           capture_output=True, text=True, timeout=1800)
    assert train.returncode == 0, train.stdout + train.stderr
    assert f"Config: {site / 'nfnets_jax' / 'configs' / 'digits.py'} (default)" in train.stdout
    assert "Done: 3 steps." in train.stdout
    workdir = run_dir / "workdirs" / "digits"
    provenance = json.loads((workdir / "provenance.json").read_text())
    assert provenance["git"] is None  # an installed copy is not a checkout: no commit to claim
    assert provenance["versions"]["nfnets-jax"]

    evaluate = subprocess.run([str(bin_dir / "nfnets-eval")], cwd=run_dir, env=_clean_env(),
                              capture_output=True, text=True, timeout=1800)
    assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr
    assert (workdir / "eval_results.json").is_file()

    # The installed programs check their flags as the checkout's do: a mistake is one line.
    for program, args in (("nfnets-train", ["--config.train.batch_sise=64", "--workdir=never_made"]),
                          ("nfnets-eval", ["--config=no_such_config.py"])):
        bad = subprocess.run([str(bin_dir / program), *args], cwd=run_dir, env=_clean_env(),
                             capture_output=True, text=True, timeout=600)
        stderr = bad.stderr.strip()
        assert bad.returncode == 1 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    assert not (run_dir / "never_made").exists()


def test_installed_programs_import_their_siblings_relatively():
    """experiments/ and configs/ install as nfnets_jax.experiments and nfnets_jax.configs, where
    no top-level `experiments` or `configs` exists: an absolute import of either, anywhere in
    code that is installed, works in the checkout and fails after `pip install .`."""
    import ast  # pylint: disable=import-outside-toplevel

    offenders = []
    for folder in ("experiments", "configs", "nfnets_jax"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}" for name in names
                              if name.split(".")[0] in ("experiments", "configs")]
    assert not offenders, "\n".join(offenders)


@pytest.mark.slow
def test_the_quickstart_notebook_runs_from_the_installed_package_outside_the_checkout(installed):
    """Colab's situation: the package installed, no checkout. The notebook (smoke sizes) finds its
    config and the pretrained weights in the installed package, and its install cell skips."""
    pytest.importorskip("nbclient")
    python, _, run_dir = installed
    site = _site_packages(python)
    notebook = run_dir / "quickstart.ipynb"
    shutil.copy(REPO / "notebooks" / "quickstart.ipynb", notebook)
    script = (
        "import sys, nbformat, nbclient\n"
        "from nfnets_jax.experiments import run_notebooks\n"
        "notebook = nbformat.read(sys.argv[1], as_version=4)\n"
        "nbclient.NotebookClient(notebook, timeout=1200, kernel_name='python3').execute(\n"
        "    env=run_notebooks.kernel_environment(smoke=True))\n"
        "install = next(cell for cell in notebook.cells if cell.cell_type == 'code')\n"
        "print(''.join(out.get('text', '') for out in install.outputs))\n")
    result = subprocess.run([str(python), "-c", script, str(notebook)], cwd=run_dir, env=_clean_env(),
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    origin = result.stdout.strip().splitlines()[-1].removeprefix("nfnets_jax: ")
    assert pathlib.Path(origin).is_relative_to(site), origin  # the kernel imported the installed copy
