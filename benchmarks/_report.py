"""Shared helper of the benchmark scripts: rewrite one section of docs/benchmarks.md in place.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; other
sections are left untouched, so scripts can be re-run independently.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def update_benchmarks_md(name: str, title: str, command: str, device: str, header: list[str],
                         rows: list[list[str]], note: str = "") -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    body = "\n".join([
        start, f"## {title}", "",
        f"Measured {_dt.date.today().isoformat()} on {device} with `{command}`.", "",
        markdown_table(header, rows), "", note, end,
    ])
    replace_section(DOC, start, end, body, "# Benchmarks\n\nNumbers written by the scripts in `benchmarks/`.\n")


def replace_section(doc: Path, start: str, end: str, body: str, new_doc: str = "") -> None:
    """Put ``body`` (which begins with ``start`` and ends with ``end``) in place of that section of
    ``doc``, or append it when the markers are absent."""
    text = doc.read_text() if doc.exists() else new_doc
    if start in text and end in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    doc.write_text(text)
