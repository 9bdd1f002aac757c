"""README.md is the user's contract: its install and test commands are the ones CI runs."""

import pathlib
import re


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _indented_commands(markdown: str, heading: str) -> list[str]:
    """Returns the indented command lines of the README section that starts at `heading`."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if re.match(r"^( {4}|\t)\S", line)]


_MAKE_VENV = re.compile(r'python3 -m venv "?([^\s"]+)"? && source "?\1/bin/activate"?')


def _venv_folder_named_alike(command: str) -> str:
    """`python3 -m venv X && source X/bin/activate` with X replaced by one name: README names its
    folder `.venv`, .ci/run a temporary one; the step is the same."""
    return _MAKE_VENV.sub("python3 -m venv VENV && source VENV/bin/activate", command)


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci_lines = [_venv_folder_named_alike(line.strip()) for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = _indented_commands(readme, "## Install")
    tests = _indented_commands(readme, "## Run the tests")
    assert install and tests
    for command in install + tests:
        assert _venv_folder_named_alike(command) in ci_lines, f"README command {command!r} is not what .ci/run runs"


def test_ci_and_readme_install_into_a_venv_made_from_the_bare_interpreter():
    """The suite runs where only what the install step installed is importable: every venv that
    README or .ci/run makes is a bare one (a --system-site-packages venv made from inside another
    venv would see the base interpreter's packages, never the outer venv's)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _MAKE_VENV.fullmatch(_indented_commands(readme, "## Install")[0])
    venv_lines = [line for line in ci.splitlines() if "-m venv" in line]
    assert len(venv_lines) == 2 and all(_MAKE_VENV.search(line) for line in venv_lines), venv_lines
    assert "system-site-packages" not in ci
    # The suite runs before the first `deactivate`, inside the first venv.
    suite = _indented_commands(readme, "## Run the tests")[0]
    assert ci.index(venv_lines[0]) < ci.index(suite) < ci.index("deactivate")


def test_readme_install_is_pinned_by_the_lock_that_the_readme_says_how_to_refresh():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = _indented_commands(readme, "## Install")
    assert any("-c requirements/lock.txt" in command for command in install), install
    assert (ROOT / "requirements" / "lock.txt").is_file()
    assert "bash tools/update_lock.sh" in readme and (ROOT / "tools" / "update_lock.sh").is_file()
    assert "bash tools/update_lock.sh" in (ROOT / "docs" / "development.md").read_text(encoding="utf-8")


def test_readme_is_a_front_door_of_at_most_250_lines():
    """Guides, speed, memory plans and the architecture live in docs/; README links them."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250


def test_ci_can_run_against_the_newest_releases_instead_of_the_lock():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "NFNETS_UNPINNED" in ci and "NFNETS_UNPINNED=1 bash .ci/run" in readme
    unpinned = ci.split('if [[ "${NFNETS_UNPINNED:-0}" == "1" ]]; then', 1)[1].split("else", 1)[0]
    assert "--upgrade" in unpinned and "requirements/lock.txt" not in unpinned


def test_licence_notice_and_citation_name_the_papers():
    import yaml

    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    assert "deepmind-research" in (ROOT / "NOTICE").read_text()
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    titles = {ref["title"]: ref["year"] for ref in citation["references"]}
    assert titles == {
        "High-Performance Large-Scale Image Recognition Without Normalization": 2021,
        "Characterizing signal propagation to close the performance gap in unnormalized ResNets": 2021,
    }
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for title in titles:
        assert f"title     = {{{title}}}" in readme, f"README lacks the BibTeX entry of {title!r}"
