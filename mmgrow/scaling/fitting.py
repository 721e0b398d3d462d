"""Fitting scaling laws to runs: log-log least squares for power laws, Huber + variable projection for loss laws.

* :func:`fit_power_law` -- y = coef N**n_exp T**t_exp, ordinary least squares on
  log y = log coef + n_exp log N + t_exp log T (the video-DiT eta_opt / B_opt laws; fit through cell optima).
* :func:`fit_compute_power_law` -- y = coef C**c_exp, least squares on log y = log coef + c_exp log C (DeepSeek).
* :func:`~mmgrow.scaling.loss_fit.fit_loss_law` (re-exported) -- Chinchilla Approach 3.

N, T, C are divided by the ``units`` scales before the logs; inputs are RAW counts. Constants are returned
UNROUNDED; bootstrap refits resample points with replacement (:mod:`mmgrow.scaling.fit_result`).
"""
from __future__ import annotations

import numpy as np

from mmgrow.scaling.columns import columns, distinct, require_spread
from mmgrow.scaling.fit_result import FitResult, bootstrap_rows
from mmgrow.scaling.laws import ComputePowerLaw, PowerLaw
from mmgrow.scaling.loss_fit import fit_loss_law
from mmgrow.scaling.units import Units

__all__ = ["FitResult", "fit_compute_power_law", "fit_loss_law", "fit_power_law"]


def _lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """Least-squares coefficients, or None when the design is rank-deficient (the law is not identified)."""
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return None
    return np.linalg.lstsq(design, target, rcond=None)[0]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2)))


def fit_power_law(params, tokens, y, units: Units, *, bootstrap: int = 0, seed: int = 0) -> FitResult:
    """Fit y = coef * N**n_exp * T**t_exp (N = params / params_scale, T = tokens / tokens_scale) by OLS on logs.

    Needs >= 2 distinct N ('one model size' otherwise), >= 2 distinct T ('one token budget') and N, T not
    varying together (a rank-3 design). Non-positive or non-finite values -> ValueError naming column and row.
    """
    cols = columns(params=params, tokens=tokens, y=y)
    n_pts = len(cols["y"])
    require_spread(cols, "fit_power_law", "the N exponent", "the T exponent")
    log_n = np.log(cols["params"] / units.params_scale)
    log_t = np.log(cols["tokens"] / units.tokens_scale)
    log_y = np.log(cols["y"])
    design = np.column_stack([np.ones(n_pts), log_n, log_t])
    beta = _lstsq(design, log_y)
    if beta is None:
        raise ValueError("fit_power_law: N and T vary together (the design has rank < 3); the N and T exponents "
                         "cannot be separated -- add runs at other (N, T) combinations")
    notes: list[str] = []

    def refit(idx: np.ndarray) -> np.ndarray | None:
        b = _lstsq(design[idx], log_y[idx])
        return None if b is None else np.array([np.exp(b[0]), b[1], b[2]])

    law = PowerLaw({"coef": float(np.exp(beta[0])), "n_exp": float(beta[1]), "t_exp": float(beta[2])}, units=units,
                   provenance=f"fit_power_law on {n_pts} points (log-log least squares)")
    return FitResult(law=law, residual=_rms(design @ beta - log_y), n_points=n_pts,
                     bootstrap=bootstrap_rows(refit, n_pts, bootstrap, seed, notes), notes=notes)


def fit_compute_power_law(flops, y, units: Units, *, bootstrap: int = 0, seed: int = 0) -> FitResult:
    """Fit y = coef * C**c_exp (C = flops / flops_scale) by OLS on logs; needs >= 2 distinct budgets."""
    cols = columns(flops=flops, y=y)
    n_pts = len(cols["y"])
    if distinct(cols["flops"]) < 2:
        raise ValueError("fit_compute_power_law: one compute budget (flops) -- cannot fit the C exponent; "
                         ">= 2 budgets are needed")
    design = np.column_stack([np.ones(n_pts), np.log(cols["flops"] / units.flops_scale)])
    log_y = np.log(cols["y"])
    beta = _lstsq(design, log_y)
    notes: list[str] = []

    def refit(idx: np.ndarray) -> np.ndarray | None:
        b = _lstsq(design[idx], log_y[idx])
        return None if b is None else np.array([np.exp(b[0]), b[1]])

    law = ComputePowerLaw({"coef": float(np.exp(beta[0])), "c_exp": float(beta[1])}, units=units,
                          provenance=f"fit_compute_power_law on {n_pts} points (log-log least squares)")
    return FitResult(law=law, residual=_rms(design @ beta - log_y), n_points=n_pts,
                     bootstrap=bootstrap_rows(refit, n_pts, bootstrap, seed, notes), notes=notes)
