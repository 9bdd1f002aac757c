"""Every `.md` file the code, tests and docs cite is in the repository.

A citation a reader cannot open is useless, so each `<name>.md` mentioned in a `.py`, `.md` or
`.ipynb` file must resolve to a file of this repository: relative to the citing file, relative to
the repository root, or by basename. Citations of other repositories (URLs, and paths under
`deepmind-research/`) are not files of ours and are skipped. The project's private research notes
were never part of the repository; their names must not appear in any file. The README lists every
page under docs/.

Only files present when the test runs are checked: in a git checkout the tracked files plus the
untracked ones git does not ignore, otherwise every file under the root (so files added on other
branches are checked once they arrive).
"""

from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
THIS_FILE = pathlib.Path(__file__).resolve()

MD_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*\.md\b")
CITING_SUFFIXES = (".py", ".md", ".ipynb")
# References to other repositories, written as `repository/path`: not files of ours.
EXTERNAL_PREFIXES = ("deepmind-research/", "google-deepmind/", "pytorch-image-models/")
# Names of research notes that lived outside the repository while it was written.
PRIVATE_NOTES = re.compile(
    r"(?<![A-Za-z0-9_])(official_nfnets|paper\.md|STYLE\.md|ecosystem\.md|DESIGN\.md|timm_baseline)"
)
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist", ".venv", "venv", "node_modules"}


def repository_files() -> list[pathlib.Path]:
    """Relative paths of the repository's files that exist now."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode("utf-8").split("\0")
        paths = [pathlib.Path(p) for p in listed if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        paths = [
            p.relative_to(ROOT) for p in ROOT.rglob("*")
            if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
        ]
    return sorted({p for p in paths if (ROOT / p).is_file()})


def read_text(path: pathlib.Path) -> str | None:
    try:
        return (ROOT / path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary data (.npz, images)


def md_references(text: str) -> list[str]:
    """The `.md` names a text cites, leaving out URLs and other repositories' paths."""
    found = []
    for match in MD_REFERENCE.finditer(text):
        start = match.start()
        token_start = max(text.rfind(c, 0, start) for c in " \t\n\"'`(<[") + 1
        if "://" in text[token_start:match.end()]:
            continue
        reference = match.group()
        if reference.startswith(EXTERNAL_PREFIXES):
            continue
        found.append(reference)
    return found


def resolves(reference: str, citing: pathlib.Path, paths: set[str], basenames: set[str]) -> bool:
    relative = (ROOT / citing.parent / reference).resolve()
    if relative.is_relative_to(ROOT) and str(relative.relative_to(ROOT)) in paths:
        return True
    return reference.lstrip("./") in paths or pathlib.PurePosixPath(reference).name in basenames


def test_md_reference_extraction():
    md = ".md"  # assembled, so that this example text is not itself a citation in the tree
    text = (f"see docs/recipe{md}, (STYLE{md}) and `a/b_c{md}`; https://github.com/x/y/README{md} is "
            f"a URL and deepmind-research/nfnets/README{md} another repository")
    assert md_references(text) == [f"docs/recipe{md}", f"STYLE{md}", f"a/b_c{md}"]


def test_every_cited_md_file_is_in_the_repository():
    files = repository_files()
    paths = {p.as_posix() for p in files}
    basenames = {p.name for p in files}
    dangling = []
    for path in files:
        if path.suffix not in CITING_SUFFIXES or (ROOT / path).resolve() == THIS_FILE:
            continue  # this file's own examples are not citations
        text = read_text(path)
        for reference in md_references(text or ""):
            if not resolves(reference, path, paths, basenames):
                dangling.append(f"{path}: {reference}")
    assert not dangling, (
        "These files cite .md files that are not in the repository; cite the paper's section, the "
        "official code's file and function, or a page under docs/ instead:\n" + "\n".join(dangling)
    )


def test_no_file_names_the_private_research_notes():
    mentions = []
    for path in repository_files():
        if (ROOT / path).resolve() == THIS_FILE:
            continue  # the pattern itself
        text = read_text(path)
        for number, line in enumerate((text or "").splitlines(), 1):
            if PRIVATE_NOTES.search(line):
                mentions.append(f"{path}:{number}: {line.strip()}")
    assert not mentions, (
        "These lines name research notes that are not part of the repository; cite the paper, the "
        "official code or a page under docs/ instead:\n" + "\n".join(mentions)
    )


def test_readme_lists_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # Pages are docs/*.md; files in docs/ subfolders are parts of a page (e.g. the written readings
    # that docs/reproduction.md includes), not pages of their own.
    pages = [p.as_posix() for p in repository_files()
             if len(p.parts) == 2 and p.parts[0] == "docs" and p.suffix == ".md"]
    assert pages, "docs/ holds no pages"
    missing = [page for page in pages if page not in readme]
    assert not missing, f"README.md does not mention these docs pages (add them to 'Documentation'): {missing}"
