"""Sections of a docs page that a program writes from JSON, between two HTML comment markers.

A page whose numbers are typed by hand drifts from the measurements behind it. Pages here keep
their figures in a generated section instead: `<!-- generated: NAME start -->` ... `<!-- generated:
NAME end -->`, rewritten by the program that renders the JSON (e.g. `experiments.run_record
--page`), and a test renders the JSON again and compares it with what the page shows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of the section `name`."""
    return f"<!-- generated: {name} start -->", f"<!-- generated: {name} end -->"


def _span(page: str, name: str) -> tuple[int, int]:
    start_marker, end_marker = markers(name)
    start, end = page.find(start_marker), page.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"the page has no '{start_marker}' ... '{end_marker}' markers for its "
                         f"generated section: add them where the section goes.")
    return start + len(start_marker), end


def section(page: str, name: str) -> str:
    """The text of the generated section `name` (without its markers and surrounding newlines)."""
    start, end = _span(page, name)
    return page[start:end].strip("\n")


def replace_section(page: str, name: str, text: str) -> str:
    """`page` with its generated section `name` replaced by `text`; ValueError without markers."""
    start, end = _span(page, name)
    return page[:start] + "\n" + text.strip("\n") + "\n" + page[end:]


def value_range(values: Sequence[float], template: str) -> str:
    """`values` as the page prints a range: "low to high" in `template`, or one value where the two
    print alike (so a page never says "1.02× to 1.02×")."""
    low, high = template.format(min(values)), template.format(max(values))
    return low if low == high else f"{low} to {high}"


def read_json_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON records of a file a benchmark appended its output lines to (other lines, such as a
    program's `#` header, are skipped)."""
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip().startswith("{")]


def write_sections(path: str | os.PathLike[str], sections: dict[str, str]) -> None:
    """Rewrites the generated sections of the page at `path` (name -> text), all or none: a page
    without one of the markers raises ValueError and is left as it was; the write is atomic."""
    from nfnets_jax.runtime import workdir  # pylint: disable=import-outside-toplevel

    with open(path, encoding="utf-8") as page:
        text = page.read()
    for name, section_text in sections.items():
        text = replace_section(text, name, section_text)
    workdir.write_text_atomically(workdir.as_path(os.fspath(path)), text)
