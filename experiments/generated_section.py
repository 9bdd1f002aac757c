"""Sections of a docs page that a program writes from JSON, between two HTML comment markers.

A page whose numbers are typed by hand drifts from the measurements behind it. Pages here keep
their figures in a generated section instead: `<!-- generated: NAME start -->` ... `<!-- generated:
NAME end -->`, rewritten by the program that renders the JSON (e.g. `experiments.run_record
--page`), and a test renders the JSON again and compares it with what the page shows.
"""

from __future__ import annotations


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
