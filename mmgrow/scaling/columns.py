"""Input checks shared by the fitters: numeric columns that must be positive and finite, of equal length.

Errors name the column and the first offending row, so a user can find the run in a table of hundreds.
"""
from __future__ import annotations

import numpy as np


def positive_column(values, name: str) -> np.ndarray:
    """``values`` as a 1-D float array; ValueError naming ``name`` and the row of a NaN/inf/non-positive entry."""
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column {name!r}: not numeric ({exc})") from exc
    bad = ~(np.isfinite(arr) & (arr > 0))
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"column {name!r}: row {row} is {float(arr[row])!r}; expected positive finite values "
                         f"({int(bad.sum())} bad row(s))")
    return arr


def columns(**named) -> dict[str, np.ndarray]:
    """Check every named column with :func:`positive_column` and that all have the same length."""
    out = {name: positive_column(values, name) for name, values in named.items()}
    lengths = {name: len(arr) for name, arr in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    return out


def distinct(values: np.ndarray, rtol: float = 1e-9) -> int:
    """Number of distinct values up to a relative tolerance (1e9 and 1e9 * (1 + 1e-12) are one size)."""
    v = np.sort(np.asarray(values, dtype=float))
    if len(v) == 0:
        return 0
    return 1 + int(np.sum(np.diff(v) > rtol * np.abs(v[1:])))


def require_spread(cols: dict[str, np.ndarray], who: str, n_term: str, t_term: str) -> None:
    """ValueError unless ``cols`` holds at least two model sizes (``params``) and two budgets (``tokens``):
    the N and T exponents (``n_term``, ``t_term``: what they appear in) cannot be fitted otherwise."""
    if distinct(cols["params"]) < 2:
        raise ValueError(f"{who}: one model size (params) -- cannot fit {n_term}; runs at >= 2 sizes are needed")
    if distinct(cols["tokens"]) < 2:
        raise ValueError(f"{who}: one token budget (tokens) -- cannot fit {t_term}; runs at >= 2 budgets are needed")
