"""A fitted law with its statistics, and the resampling bootstrap all fitters share.

Bootstrap (Efron's nonparametric, percentile intervals): refit on ``n`` points drawn with replacement,
``bootstrap`` times; the refits' constants are kept as rows (law.parameters order) so any prediction
fn(law) gets an interval from the same refits (:meth:`FitResult.predict_interval`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmgrow.scaling.laws import Law


@dataclass
class FitResult:
    """A fitted law (UNROUNDED constants) plus: ``residual`` = RMS of log-residuals (log y_pred - log y),
    ``n_points``, ``bootstrap`` (one row of constants per refit, law.parameters order; (0, 0) when not
    bootstrapped) and ``notes`` (fallbacks, failed resamples, parameters at a bound)."""

    law: Law
    residual: float
    n_points: int
    bootstrap: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    notes: list[str] = field(default_factory=list)

    def intervals(self, level: float = 0.9) -> dict[str, tuple[float, float]]:
        """Percentile intervals {name: (lo, hi)} of each constant over the refits; {} when not bootstrapped."""
        lo_q, hi_q = _quantiles(level)
        if self.bootstrap.size == 0:
            return {}
        lo, hi = np.percentile(self.bootstrap, [lo_q, hi_q], axis=0)
        return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(self.law.parameters)}

    def bootstrap_laws(self) -> list[Law]:
        """The refits as laws of the fitted law's class and units."""
        cls = type(self.law)
        return [cls(dict(zip(self.law.parameters, (float(v) for v in row), strict=True)), units=self.law.units,
                    provenance=self.law.provenance, confirmed=self.law.confirmed) for row in self.bootstrap]

    def predict_interval(self, fn: Callable[[Law], Any], level: float = 0.9) -> tuple[float, float]:
        """(lo, hi) percentile interval of fn(law_i) over the bootstrap laws (fn may return arrays: then
        lo and hi are arrays). ValueError when the fit was not bootstrapped (no honest interval exists)."""
        lo_q, hi_q = _quantiles(level)
        if self.bootstrap.size == 0:
            raise ValueError("predict_interval: this fit has no bootstrap refits; fit with bootstrap > 0")
        values = np.asarray([fn(law) for law in self.bootstrap_laws()], dtype=float)
        lo, hi = np.percentile(values, [lo_q, hi_q], axis=0)
        return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)

    def to_dict(self) -> dict[str, Any]:
        return {"law": self.law.to_dict(), "residual": float(self.residual), "n_points": int(self.n_points),
                "bootstrap": self.bootstrap.tolist(), "notes": list(self.notes)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FitResult:
        if not isinstance(d, dict) or "law" not in d:
            raise ValueError("fit result: expected a mapping with 'law', 'residual', 'n_points', 'bootstrap', "
                             "'notes'")
        law = Law.from_dict(d["law"])
        rows = d.get("bootstrap") or []
        boot = np.asarray(rows, dtype=float) if rows else np.empty((0, 0))
        if boot.size and (boot.ndim != 2 or boot.shape[1] != len(law.parameters)):
            raise ValueError(f"fit result: bootstrap rows must have {len(law.parameters)} constants "
                             f"{list(law.parameters)}, got shape {boot.shape}")
        return FitResult(law=law, residual=float(d.get("residual", float("nan"))), n_points=int(d.get("n_points", 0)),
                         bootstrap=boot, notes=list(d.get("notes", [])))


def _quantiles(level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: expected a coverage in (0, 1), e.g. 0.9")
    return 50.0 * (1.0 - level), 50.0 * (1.0 + level)


def bootstrap_rows(refit: Callable[[np.ndarray], np.ndarray | None], n: int, bootstrap: int, seed: int,
                   notes: list[str]) -> np.ndarray:
    """Rows of constants from ``bootstrap`` resamples: ``refit(indices)`` returns the constants or None when
    the resample cannot be fitted (e.g. it holds one model size); such draws are replaced (up to 10x tries)
    and counted in ``notes``."""
    if bootstrap <= 0:
        return np.empty((0, 0))
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    failed = 0
    while len(rows) < bootstrap and failed < 10 * bootstrap:
        row = refit(rng.integers(0, n, size=n))
        if row is None:
            failed += 1
        else:
            rows.append(row)
    if failed:
        notes.append(f"bootstrap: {failed} resample(s) could not be fitted and were redrawn")
    if len(rows) < bootstrap:
        notes.append(f"bootstrap: only {len(rows)} of {bootstrap} refits succeeded")
    return np.asarray(rows, dtype=float) if rows else np.empty((0, 0))
