"""Mean and spread over seeds, and how they are printed.

``spread`` is the **sample standard deviation** over the n runs of a group,
``s = sqrt(sum_i (x_i - mean)^2 / (n - 1))``, rounded to two significant digits after ``±``; with n = 1 only
the value is printed (no spread can be estimated from one seed). Non-finite values (a NaN loss) are not
averaged: they are counted in ``dropped``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MISSING = "—"


@dataclass(frozen=True)
class Stat:
    """``mean`` and sample ``std`` of ``n`` finite values (std None when n < 2, mean None when n = 0)."""

    mean: float | None
    std: float | None
    n: int
    dropped: int = 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n, "dropped": self.dropped}


def mean_spread(values: Sequence[float]) -> Stat:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    dropped = len(values) - len(finite)
    n = len(finite)
    if n == 0:
        return Stat(None, None, 0, dropped)
    mean = math.fsum(finite) / n
    if n == 1:
        return Stat(mean, None, 1, dropped)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
    return Stat(mean, std, n, dropped)


def format_number(x: float | None) -> str:
    """Integers below 1e12 (parameter and token counts) in full with thousands separators, others to 4 significant
    digits; None as ``—``."""
    if x is None:
        return MISSING
    if not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) < 1e12:  # beyond, a count is easier to read as 1.234e+12
        return f"{int(x):,}"
    return f"{x:.4g}"


def format_stat(stat: Stat) -> str:
    """``mean ± std`` (std to 2 significant digits), ``mean`` alone for n = 1, ``—`` for n = 0."""
    if stat.mean is None:
        return MISSING
    if stat.std is None:
        return format_number(stat.mean)
    return f"{format_number(stat.mean)} ± {format_spread(stat.std)}"


def format_spread(std: float) -> str:
    """``std`` rounded to 2 significant digits, printed like a value (141.42 -> ``140``, 0.14142 -> ``0.14``)."""
    return format_number(float(f"{std:.2g}")) if math.isfinite(std) else str(std)
