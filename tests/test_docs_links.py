"""The README and docs/ link only to what the repository holds: every relative markdown link resolves to a
file (and its ``#anchor`` to a heading of it), and every ``*.md`` file the text names exists here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> ``-``."""
    headings = re.findall(r"^#+\s+(.*)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for link in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        missing = not target.exists() or ROOT not in target.parents
        if missing or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
            broken.append(link)
    assert not broken, f"{page.relative_to(ROOT)} links to what the repository does not hold: {broken}"


RUN_OUTPUTS = {"tasks.md", "report.md"}
"""Markdown files that runs write (the per-task table of a run directory, `mmgrow report`'s comparison), not pages
of the repository."""


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_markdown_files_exist(page):
    """Plain-text citations such as ``DESIGN.md §3`` or ``reference/growth.md`` count as links too."""
    names = {Path(m).name for m in re.findall(r"[\w./-]+\.md\b", page.read_text())}
    have = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts} | RUN_OUTPUTS
    assert not sorted(names - have), f"{page.relative_to(ROOT)} names files the repository does not hold: {sorted(names - have)}"
