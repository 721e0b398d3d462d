"""Argument checks with one message shape: ``<owner>: <field> must be <expectation>, got <value>``
(``owner`` empty for a command-line option: ``--frames must be a positive int, got 0``).

Constructors and console commands call these on what a user typed (a recipe value, a command-line
option, a file), so a bad value fails at once with the field, the value and what is expected,
instead of deep in torch or hours into a run. The console prints such a ``ValueError`` / ``TypeError``
as one line (:mod:`mmgrow.cli_errors`). It sits at the bottom of the layering: no mmgrow imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _subject(owner: str, field: str) -> str:
    return f"{owner}: {field}" if owner else field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(owner: str, field: str, value: Any, low: int) -> int:
    """``value`` if it is an int ``>= low``, else ``ValueError('<owner>: <field> must be an int >= low, got v')``."""
    if not _is_int(value) or value < low:
        raise ValueError(f"{_subject(owner, field)} must be an int >= {low}, got {value!r}")
    return value


def positive_int(owner: str, field: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{_subject(owner, field)} must be a positive int, got {value!r}")
    return value


def finite_number(owner: str, field: str, value: Any, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """``value`` if it is a finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    ok = _is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low is not None and high is not None:
            want = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            want = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            want = "a finite number"
        raise ValueError(f"{_subject(owner, field)} must be {want}, got {value!r}")
    return float(value)


def utf8_text(data: bytes, what: str) -> str:
    """``data`` decoded as UTF-8, or ``ValueError('<what> is not UTF-8 text: byte 0xff at offset 13')``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1].hex()
        raise ValueError(f"{what} is not UTF-8 text: byte 0x{bad} at offset {exc.start} ({exc.reason}); "
                         "save it as UTF-8") from None


def read_utf8(path: str | Path, what: str | None = None) -> str:
    """The text of ``path`` (UTF-8); a file in another encoding is a ``ValueError`` naming it and the offset."""
    path = Path(path)
    return utf8_text(path.read_bytes(), what or str(path))


def utf8_argument(option: str, value: str) -> str:
    """A command-line string that must be valid UTF-8 (Python keeps undecodable argv bytes as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(value[exc.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise ValueError(f"{option} is not UTF-8 text: {byte} at character {exc.start}; pass UTF-8 text") from None
    return value


def mapping_with_keys(subject: str, value: Any, allowed: Sequence[str]) -> Mapping[str, Any]:
    """``value`` if it is a mapping whose keys are all in ``allowed``, else ``ValueError`` naming
    ``subject`` (e.g. ``"data.sources[2]"``), the unknown keys and the allowed ones."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{subject}: must be a mapping with keys among {list(allowed)}, got {value!r}")  # noqa: TRY004 - a recipe value, reported like every other bad value
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{subject}: unknown keys {unknown}; expected keys among {list(allowed)}")
    return value


def read_optional_json(path: str | Path, hint: str = "") -> Any:
    """The JSON value in ``path``, or None when the file does not exist; a ValueError naming the file (and
    ``hint``, what to do about it) when it is not valid JSON."""
    import json

    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(read_utf8(path))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}){'; ' + hint if hint else ''}") from exc


def read_yaml(path: str | Path, what: str, label: str | None = None) -> Any:
    """The YAML value in ``path`` (UTF-8): FileNotFoundError ``"<what> not found: <path>"``; ValueError for text
    that is not UTF-8 (named ``label``, default ``"<what> <path>"``) or not YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(read_utf8(path, label or f"{what} {path}"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
