"""Docstrings (reStructuredText) as plain text for ``argparse`` help, which prints markup verbatim."""

from __future__ import annotations

import re


def plain_text(rst: str) -> str:
    """Double-backtick literals lose their backticks; ``:class:`~a.b.Name``` becomes ``Name`` and
    ``:func:`a.b``` becomes ``a.b``."""
    text = re.sub(r":[a-z]+:`~[^`]*?([^`.]+)`", r"\1", rst)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return text.replace("``", "")
