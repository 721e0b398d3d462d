"""Runs -> ``laws.json`` -> predictions: the whole fit of ``mmgrow scaling fit`` and ``mmgrow scaling predict``.

:func:`fit_study` on a :class:`~mmgrow.scaling.table.RunTable`:

1. groups the rows into (N, T) cells and locates each cell's optimum between grid points
   (:func:`~mmgrow.scaling.optimum.cell_optimum`: a quadratic in (log lr, log B) around the best run, with
   fallbacks named in the cell's notes);
2. fits ``lr_opt = coef N^a T^b`` and ``batch_size_opt`` (the video-DiT form) through the cell optima by log-log
   least squares, bootstrapped over cells;
3. fits the loss law at optimal hyperparameters (``loss``: Chinchilla's form E + A/N^alpha + B/T^beta, or the
   video-DiT spelling of it) through the cells' optimal losses -- Huber on log loss, variable projection and
   multi-start L-BFGS -- and, for the video-DiT paper's comparison, the same law through the runs at ONE fixed
   (lr, batch) present in every cell (``loss_fixed_hparams``);
4. stores everything unrounded, with units, the runs kept out and why, and each fit's bootstrap refits (so a
   prediction's interval comes from the same refits as the constants').

A table without lr/batch_size fits the loss law through all rows. A fit the data cannot support (one model size,
one budget, too few cells) is left ``null`` with the reason in ``data.warnings``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmgrow.rundir import atomic_write_bytes, strict_json
from mmgrow.scaling.fit_result import FitResult
from mmgrow.scaling.fitting import fit_loss_law, fit_power_law
from mmgrow.scaling.optimum import cell_optimum
from mmgrow.scaling.table import RunTable
from mmgrow.scaling.units import Units

FORMAT_VERSION = 1
FITS = ("lr_opt", "batch_size_opt", "loss", "loss_fixed_hparams")


def _cells(table: RunTable) -> dict[tuple[float, float], np.ndarray]:
    keys = list(zip(table.params.tolist(), table.tokens.tolist()))
    out: dict[tuple[float, float], list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return {k: np.array(v) for k, v in sorted(out.items())}


def _try(warnings: list[str], what: str, fn, *args, **kwargs) -> FitResult | None:
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        warnings.append(f"{what} not fitted: {exc}")
        return None


def _fixed_pair(table: RunTable, cells: dict, fixed_lr: float | None, fixed_batch: float | None) -> tuple[float, float]:
    """The (lr, batch) of the fixed-hyperparameter law: given, else the pair present in the most cells (ties: the
    pair nearest the middle of the grid in log lr, then log batch)."""
    present = Counter()
    for idx in cells.values():
        present.update(set(zip(table.lr[idx].tolist(), table.batch_size[idx].tolist())))
    if fixed_lr is not None or fixed_batch is not None:
        pairs = [p for p in present if (fixed_lr is None or np.isclose(p[0], fixed_lr))
                 and (fixed_batch is None or np.isclose(p[1], fixed_batch))]
        if not pairs:
            raise ValueError(f"no run has lr={fixed_lr} and batch_size={fixed_batch}; grid pairs are e.g. "
                             f"{sorted(present)[:4]}")
        return max(pairs, key=lambda p: present[p])
    mid_lr = np.median(np.log(sorted(set(table.lr.tolist()))))
    mid_b = np.median(np.log(sorted(set(table.batch_size.tolist()))))
    return max(present, key=lambda p: (present[p], -abs(np.log(p[0]) - mid_lr), -abs(np.log(p[1]) - mid_b)))


def _at_edge(co, lr: np.ndarray, batch: np.ndarray) -> list[str]:
    """Which of lr / batch_size the cell's optimum takes at the smallest or largest grid value: a best-cell (or
    batch-fixed) fallback there means the optimum was not located inside the grid."""
    out = []
    for what, value, grid in (("lr", co.lr, lr), ("batch_size", co.batch_size, batch)):
        if np.isclose(value, grid.min(), rtol=1e-9, atol=0) or np.isclose(value, grid.max(), rtol=1e-9, atol=0):
            out.append(what)
    return out


def fit_study(table: RunTable, *, band: float = 0.0025, bootstrap: int = 200, seed: int = 0,
              loss_form: str = "chinchilla", fixed_lr: float | None = None, fixed_batch_size: float | None = None,
              radius: int = 1) -> dict[str, Any]:
    """The ``laws.json`` content of the module docstring (plain JSON types, unrounded)."""
    units: Units = table.units
    warnings = list(table.warnings)
    out: dict[str, Any] = {"mmgrow_scaling": FORMAT_VERSION, "units": units.to_dict(),
                           **{k: None for k in FITS}, "fixed_hparams": None, "cells": []}
    if table.has_hyperparameters:
        cells = _cells(table)
        optima = []
        edges: dict[str, list[str]] = {}
        for (params, tokens), idx in cells.items():
            if len(set(table.lr[idx].tolist())) < 2:
                warnings.append(f"cell N={params:g}, T={tokens:g}: one learning rate; no optimum located")
                continue
            co = cell_optimum(table.lr[idx], table.batch_size[idx], table.loss[idx], band=band, radius=radius)
            optima.append((params, tokens, co))
            at_edge = _at_edge(co, table.lr[idx], table.batch_size[idx])
            for what in at_edge:
                edges.setdefault(what, []).append(f"N={params:g} T={tokens:g}")
            out["cells"].append({
                "params": params, "tokens": tokens, "lr_opt": co.lr, "batch_size_opt": co.batch_size,
                "loss_opt": co.loss, "method": co.method, "runs": len(idx),
                "best_run": table.names[idx[co.best_run]], "best_loss": float(table.loss[idx[co.best_run]]),
                "near_optimal": [table.names[idx[i]] for i in co.near_optimal], "notes": co.notes,
                "at_edge": at_edge})
        for what, where in edges.items():
            warnings.append(f"{what}: {len(where)} of {len(optima)} cell optima sit on the edge of (or are the only "
                            f"value in) the cell's {what} grid ({'; '.join(where[:4])}{' ...' if len(where) > 4 else ''})"
                            f": the true optimum lies at or beyond it, so the {what}_opt law through them is biased; "
                            "extend the grid there")
        if optima:
            n, t = np.array([o[0] for o in optima]), np.array([o[1] for o in optima])
            lr = np.array([o[2].lr for o in optima])
            batch = np.array([o[2].batch_size for o in optima])
            loss = np.array([o[2].loss for o in optima])
            for key, y in (("lr_opt", lr), ("batch_size_opt", batch)):
                fit = _try(warnings, key, fit_power_law, n, t, y, units, bootstrap=bootstrap, seed=seed)
                out[key] = None if fit is None else fit.to_dict()
            fit = _try(warnings, "loss", fit_loss_law, n, t, loss, units, form=loss_form, bootstrap=bootstrap, seed=seed)
            out["loss"] = None if fit is None else fit.to_dict()
            try:
                pair = _fixed_pair(table, cells, fixed_lr, fixed_batch_size)
            except ValueError as exc:
                if fixed_lr is not None or fixed_batch_size is not None:
                    raise
                warnings.append(f"loss_fixed_hparams not fitted: {exc}")
                pair = None
            if pair is not None:
                sel = np.isclose(table.lr, pair[0]) & np.isclose(table.batch_size, pair[1])
                n_cells = len(set(zip(table.params[sel].tolist(), table.tokens[sel].tolist())))
                out["fixed_hparams"] = {"lr": pair[0], "batch_size": pair[1], "cells": n_cells, "runs": int(sel.sum())}
                if n_cells < len(cells):  # the paper's comparison wants the SAME (lr, batch) in every cell
                    warnings.append(f"fixed hyperparameters lr={pair[0]:g}, batch_size={pair[1]:g} were run in "
                                    f"{n_cells} of {len(cells)} cells (do the cells have different grids?); "
                                    "loss_fixed_hparams uses those cells only; choose a shared pair with --fixed-lr "
                                    "and --fixed-batch-size")
                fit = _try(warnings, "loss_fixed_hparams", fit_loss_law, table.params[sel], table.tokens[sel],
                           table.loss[sel], units, form=loss_form, bootstrap=bootstrap, seed=seed)
                out["loss_fixed_hparams"] = None if fit is None else fit.to_dict()
    else:
        fit = _try(warnings, "loss", fit_loss_law, table.params, table.tokens, table.loss, units, form=loss_form,
                   bootstrap=bootstrap, seed=seed)
        out["loss"] = None if fit is None else fit.to_dict()
    if all(out[k] is None for k in FITS):
        raise ValueError(f"{table.source}: no law could be fitted: " + "; ".join(warnings))
    out["data"] = {"source": table.source, "rows": len(table), "runs": table.names, "excluded": table.excluded,
                   "warnings": warnings, "params_range": [float(table.params.min()), float(table.params.max())],
                   "tokens_range": [float(table.tokens.min()), float(table.tokens.max())]}
    out["settings"] = {"band": band, "bootstrap": bootstrap, "seed": seed, "loss_form": loss_form, "radius": radius}
    return out


def write_laws(path: str | Path, study: dict[str, Any]) -> Path:
    """Write ``laws.json`` atomically (strict JSON: non-finite numbers become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, strict_json(study))
    return path


@dataclass
class Study:
    """A read ``laws.json``: its fits (None where the data did not support one) and records."""

    units: Units
    lr_opt: FitResult | None
    batch_size_opt: FitResult | None
    loss: FitResult | None
    loss_fixed_hparams: FitResult | None
    fixed_hparams: dict[str, Any] | None
    cells: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "laws") -> Study:
        if not isinstance(d, dict) or d.get("mmgrow_scaling") != FORMAT_VERSION:
            raise ValueError(f"{source} is not an mmgrow laws file (expected the output of `mmgrow scaling fit`, "
                             f"with \"mmgrow_scaling\": {FORMAT_VERSION})")
        fits = {k: None if d.get(k) is None else FitResult.from_dict(d[k]) for k in FITS}
        return cls(units=Units.from_dict(d.get("units") or {}), fixed_hparams=d.get("fixed_hparams"),
                   cells=list(d.get("cells") or []), data=dict(d.get("data") or {}),
                   settings=dict(d.get("settings") or {}), **fits)


def read_laws(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"laws file not found: {path} (write one with `mmgrow scaling fit RUNS --out {path}`)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); expected the output of `mmgrow scaling fit`") from exc
    return Study.from_dict(data, str(path))


def _interval(fit: FitResult, fn, level: float) -> list[float] | None:
    if fit.bootstrap.size == 0:
        return None
    lo, hi = fit.predict_interval(fn, level)
    return [float(lo), float(hi)]


def predict(study: Study, params: float | None = None, tokens: float | None = None, flops: float | None = None,
            level: float = 0.9) -> dict[str, Any]:
    """``lr_opt``, ``batch_size_opt`` and ``loss`` at (params, tokens); with ``flops`` the compute-optimal
    ``params_opt`` and ``tokens_opt`` (C = 6 N T) from the loss law, and the hyperparameters and loss there.
    Plain units in and out; ``intervals`` (bootstrap percentiles at ``level``), ``warnings``."""
    warnings: list[str] = []
    out: dict[str, Any] = {}
    intervals: dict[str, list[float] | None] = {}
    if flops is not None:
        if params is not None or tokens is not None:
            raise ValueError("predict: give --flops alone, or --params with --tokens")
        if study.loss is None:
            raise ValueError("predict --flops needs a loss law, and this laws file has none (see its data.warnings)")
        params, tokens = study.loss.law.compute_optimal(float(flops))
        out.update(flops=float(flops), params_opt=params, tokens_opt=tokens)
        intervals["params_opt"] = _interval(study.loss, lambda law: law.compute_optimal(float(flops))[0], level)
        intervals["tokens_opt"] = _interval(study.loss, lambda law: law.compute_optimal(float(flops))[1], level)
    elif params is None or tokens is None:
        raise ValueError("predict: give --params and --tokens (plain units), or --flops")
    else:
        out.update(params=float(params), tokens=float(tokens))
    for key, fit in (("lr_opt", study.lr_opt), ("batch_size_opt", study.batch_size_opt), ("loss", study.loss)):
        if fit is None:
            out[key] = None
            continue
        out[key] = float(fit.law(params, tokens))
        intervals[key] = _interval(fit, lambda law, p=params, t=tokens: law(p, t), level)
        if not fit.law.confirmed:
            warnings.append(f"{key}: the law's constants are not confirmed ({fit.law.provenance})")
    warnings += _extrapolation(study, float(params), float(tokens))
    out.update(intervals=intervals, level=level, units=study.units.to_dict(), warnings=warnings)
    return out


def _extrapolation(study: Study, params: float, tokens: float) -> list[str]:
    notes = []
    for what, value, key in (("params", params, "params_range"), ("tokens", tokens, "tokens_range")):
        lo, hi = (study.data.get(key) or [None, None])
        if lo and (value > 10 * hi or value < lo / 10):
            notes.append(f"{what} = {value:.3g} is more than 10x outside the fitted range [{lo:.3g}, {hi:.3g}]")
    return notes
