"""README.md is the user's contract: its install and test commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _indented_commands(markdown: str, heading: str) -> list[str]:
    """Returns the indented command lines of the README section that starts at `heading`."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if re.match(r"^( {4}|\t)\S", line)]


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = _indented_commands(readme, "## Install")
    tests = _indented_commands(readme, "## Run the tests")
    assert install and tests
    for command in install + tests:
        assert command in ci_lines, f"README command {command!r} is not what .ci/run runs"


def test_model_zoo_table_rows_are_what_the_code_computes():
    """The README's zoo table is pasted output of `experiments.model_table`: it must stay true."""
    from experiments import model_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("nfnet_f0", "nfnet_f3plus", "nf_resnet50", "nf_regnet_b0"):
        assert model_table.model_row(name) in readme.splitlines(), f"README row for {name} is stale"
