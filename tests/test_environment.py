"""The pinned environment: requirements/lock.txt against setup.py, and the test-suite settings.

README's install command installs with the lock as constraints, so the lock must pin every
package that setup.py asks for (within setup.py's ranges) and everything those need, and nothing
that is not ours to ship (PyTorch).
"""

import ast
import configparser
import importlib.metadata
import pathlib
import re

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def setup_requirements() -> dict[str, list[Requirement]]:
    """setup.py's INSTALL_REQUIRES, TEST_REQUIRES and TPU_PLAN_REQUIRES, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    lists = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("INSTALL_REQUIRES", "TEST_REQUIRES", "TPU_PLAN_REQUIRES"):
                lists[name] = [Requirement(s) for s in ast.literal_eval(node.value)]
    assert set(lists) == {"INSTALL_REQUIRES", "TEST_REQUIRES", "TPU_PLAN_REQUIRES"}
    return lists


def lock_pins() -> dict[str, str]:
    """{canonical name: version} of requirements/lock.txt."""
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        assert match, f"requirements/lock.txt: {line!r} is not a plain 'name==version' pin"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = match.group(2)
    return pins


def test_lock_pins_every_setup_requirement_within_its_range():
    pins = lock_pins()
    for requirement in sum(setup_requirements().values(), []):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"setup.py requires {requirement}, the lock does not pin it: bash tools/update_lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {name}=={pins[name]}, outside setup.py's {requirement}: bash tools/update_lock.sh")


def test_lock_never_contains_pytorch():
    assert not {"torch", "torchvision", "torchaudio", "timm"} & set(lock_pins())


def _requirements_of(distribution: str, extras: set[str]) -> list[Requirement]:
    """The requirements that apply here of an installed distribution, with `extras` requested."""
    requirements = []
    for text in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or any(
                requirement.marker.evaluate({**default_environment(), "extra": extra})
                for extra in extras | {""}):
            requirements.append(requirement)
    return requirements


def test_lock_is_closed_under_the_installed_packages_dependencies():
    """Walks the dependency graph from setup.py through installed metadata: every package reached
    is pinned. (Complete where the environment was installed from the lock, as in CI.)"""
    pins = lock_pins()
    todo = [(r, set(r.extras)) for r in sum(setup_requirements().values(), [])]
    seen, unpinned = set(), set()
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        if name not in pins:
            unpinned.add(name)
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: its own pin was checked, its dependencies cannot be
        if installed != pins[name]:
            continue  # another release's metadata says nothing about the pinned one's needs
        children = _requirements_of(name, extras)
        todo.extend((child, set(child.extras)) for child in children)
    assert not unpinned, f"needed but not in requirements/lock.txt: {sorted(unpinned)}; run bash tools/update_lock.sh"


def test_approx_refuses_jax_arrays_in_every_pytest_version():
    """tests/conftest.py: a jax.Array inside pytest.approx breaks with pytest >= 9.2 only; here
    it fails the same way whatever pytest is installed, with the fix in the message."""
    import jax.numpy as jnp

    with pytest.raises(TypeError, match="jax.Array"):
        pytest.approx(jnp.float32(1.0))
    with pytest.raises(TypeError, match="jax.Array"):
        pytest.approx([1.0, jnp.ones(())])
    assert float(jnp.float32(0.5)) == pytest.approx(0.5)


def test_slow_marker_is_registered_and_strict():
    config = configparser.ConfigParser()
    config.read(ROOT / "pytest.ini")
    assert "--strict-markers" in config["pytest"]["addopts"]
    assert re.search(r"^slow:", config["pytest"]["markers"], re.M)
