"""Versions on every result: the provenance record of workdirs and benchmark JSON lines."""

import importlib.metadata
import json
import pathlib
import subprocess
import sys

import pytest

from nfnets_jax.runtime import provenance

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_versions_are_the_installed_distributions():
    import haiku
    import jax
    import optax

    versions = provenance.package_versions()
    assert versions["jax"] == jax.__version__
    assert versions["dm-haiku"] == haiku.__version__
    assert versions["optax"] == optax.__version__
    assert versions["jaxlib"] == importlib.metadata.version("jaxlib")
    assert versions["orbax-checkpoint"] == importlib.metadata.version("orbax-checkpoint")
    assert versions["tensorflow-datasets"] == importlib.metadata.version("tensorflow-datasets")
    # TensorFlow is installed as `tensorflow-cpu` here, `tensorflow` on GPU machines.
    tf_dists = [d for d in ("tensorflow", "tensorflow-cpu") if _installed(d)]
    assert tf_dists and versions["tensorflow"] == importlib.metadata.version(tf_dists[0])


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_collecting_versions_imports_neither_tensorflow_nor_jax():
    code = ("import sys, json; from nfnets_jax.runtime import provenance; "
            "record = provenance.collect(devices=False); "
            "print(json.dumps([record['versions']['tensorflow'], sorted("
            "m for m in ('tensorflow', 'jax') if m in sys.modules)]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=True)
    tf_version, imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert tf_version and imported == []


def test_git_commit_is_the_checkouts_head():
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not running from a git checkout")
    state = provenance.git_state()
    assert state["commit"] == head and len(head) == 40
    assert isinstance(state["dirty"], bool)


def test_an_untracked_file_makes_the_tree_dirty_and_is_named(tmp_path, monkeypatch):
    """A new, untracked module changes what runs as surely as an edit: a copy of this checkout's
    git state with one untracked file is recorded dirty, naming the file; the clean copy is not."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                    "--allow-empty", "-m", "empty"], check=True)
    monkeypatch.setattr(provenance, "_CHECKOUT", clone.resolve())
    monkeypatch.chdir(clone)
    assert provenance.git_state()["dirty"] is False
    (clone / "new_module.py").write_text("x = 1\n")
    state = provenance.git_state()
    assert state["dirty"] is True and state["untracked"] == ["new_module.py"]


def test_an_installed_copy_inside_another_repository_claims_no_commit(tmp_path, monkeypatch):
    """site-packages of a venv that lives inside some git repository is not a checkout of ours."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    site_packages = tmp_path / "venv" / "lib" / "site-packages"
    site_packages.mkdir(parents=True)
    monkeypatch.setattr(provenance, "_CHECKOUT", site_packages.resolve())
    assert provenance.git_state() is None


def test_workdir_record_has_versions_commit_machine_and_devices(tmp_path):
    import jax

    path = provenance.write(tmp_path)
    assert path == str(tmp_path / "provenance.json")
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["versions"]["jax"] == jax.__version__
    assert record["machine"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["devices"]["device_count"] == jax.device_count()
    assert record["devices"]["backend"] == jax.default_backend()
    assert "git" in record


def test_every_benchmark_that_prints_json_records_provenance():
    """A new benchmark gets the record too: each script printing JSON lines calls provenance."""
    scripts = sorted((REPO / "benchmarks").glob("*.py")) + [REPO / "experiments" / "input_benchmark.py"]
    # timm_runner.py runs under a separate torch interpreter without this package; the command that
    # starts it (compare_timm.py) records the provenance of the comparison.
    printing = [p for p in scripts if "json.dumps(" in p.read_text(encoding="utf-8") and p.name != "timm_runner.py"]
    assert printing, "no benchmark scripts found"
    missing = [p.name for p in printing if "provenance.collect(" not in p.read_text(encoding="utf-8")]
    assert not missing, f"benchmarks whose JSON lines lack nfnets_jax.runtime.provenance.collect(): {missing}"


def test_a_page_names_a_commit_by_its_first_seven_hex_digits_or_says_it_is_unknown():
    assert provenance.short_commit({"commit": "9cbff68a89fe0b7bb19a766950e9023782dbf364", "dirty": False}) == "9cbff68"
    assert provenance.short_commit({"commit": None, "dirty": None}) == "unknown"  # git present, no HEAD
    assert provenance.short_commit(None) == "unknown"  # an installed copy, not a checkout
