"""Chinchilla Approach 3: fit L(N, T) = E + A / N**alpha + B / T**beta to runs.

Objective (Hoffmann et al. 2022): minimise sum_i Huber_delta(log L_pred(N_i, T_i) - log L_i), delta = 1e-3,
so a few bad runs pull the fit less than under squares.

How (and why):
1. Variable projection for the starts: for fixed (alpha, beta) the model is LINEAR in (E, A, B), so a
   non-negative least-squares solve (rows weighted by 1/L_i, which makes residuals relative, i.e. ~log
   residuals) gives the best (E, A, B) at each point of an exponent grid. The grid is cheap and finds the
   basin; the best few grid points become the starts (Czech et al. 2026; Open-Athena/vpnls do the same).
2. Multi-start L-BFGS-B (scipy) on all five, parametrised x = (log E, a', b', alpha, beta) with CENTRED
   logs: A / N**alpha = exp(a' - alpha (log N - mean log N)). Centring removes most of the A-alpha
   correlation that makes the raw problem ill-conditioned (the Epoch replication found Chinchilla's own
   optimiser stopped early because of it).
3. Each L-BFGS result is polished by Levenberg-Marquardt on the same Huber objective (iteratively reweighted
   least squares, weights min(1, delta/|r|)): Gauss-Newton converges to full precision where L-BFGS's
   gradient test stops early on noise-free data. The polish only accepts steps that lower the objective.
   The lowest objective over the starts is kept.

Bootstrap refits resample points with replacement and restart the polish (step 3) from the full-data optimum.
N = params / params_scale and T = tokens / tokens_scale; A and B are in those units. Constants UNROUNDED.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize, nnls

from mmgrow.scaling.columns import columns, distinct, require_spread
from mmgrow.scaling.fit_result import FitResult, bootstrap_rows
from mmgrow.scaling.laws import ChinchillaLoss, LossLaw, VideoDiTLoss
from mmgrow.scaling.units import Units

# Returned law forms: the fit is always Chinchilla's; other forms of the same family convert from it.
LOSS_FORMS: dict[str, Callable[[ChinchillaLoss], LossLaw]] = {
    "chinchilla": lambda law: law,
    "video_dit": VideoDiTLoss.from_chinchilla,
}
EXPONENT_GRID = np.linspace(0.05, 1.5, 30)  # alpha and beta values tried by variable projection
N_STARTS = 4
LBFGS_MAXITER = 30
# Refits only need to resolve the spread between resamples (noise >> 1e-9), not machine precision.
BOOTSTRAP_TOL = 1e-7
_EXP_BOUNDS = (1e-3, 4.0)


class _Problem:
    """The Huber-on-log-loss objective on centred logs, with its residuals and Jacobian."""

    def __init__(self, log_n: np.ndarray, log_t: np.ndarray, loss: np.ndarray, delta: float,
                 mu_n: float, mu_t: float) -> None:
        self.u, self.v = log_n - mu_n, log_t - mu_t
        self.log_loss = np.log(loss)
        self.delta = delta

    def parts(self, x: np.ndarray):
        e, a, b, alpha, beta = x
        big_e = np.exp(e)
        term_n = np.exp(a - alpha * self.u)
        term_t = np.exp(b - beta * self.v)
        pred = big_e + term_n + term_t
        return big_e, term_n, term_t, pred

    def residuals(self, x: np.ndarray) -> np.ndarray:
        return np.log(self.parts(x)[3]) - self.log_loss

    def residuals_and_jacobian(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        big_e, term_n, term_t, pred = self.parts(x)
        jac = np.empty((len(pred), 5))
        jac[:, 0] = big_e
        jac[:, 1] = term_n
        jac[:, 2] = term_t
        jac[:, 3] = -self.u * term_n
        jac[:, 4] = -self.v * term_t
        return np.log(pred) - self.log_loss, jac / pred[:, None]

    def huber(self, r: np.ndarray) -> float:
        """sum Huber_delta(r) / delta**2 (the scale keeps L-BFGS tolerances meaningful)."""
        d = self.delta
        a = np.abs(r)
        return float(np.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d)).sum() / (d * d))

    def value(self, x: np.ndarray) -> float:
        return self.huber(self.residuals(x))

    def objective(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """The objective and its gradient J^T psi(r) / delta**2, psi(r) = clip(r, -delta, delta)."""
        r, jac = self.residuals_and_jacobian(x)
        d = self.delta
        return self.huber(r), jac.T @ np.clip(r, -d, d) / (d * d)


def _varpro_starts(problem: _Problem, loss: np.ndarray, count: int) -> list[np.ndarray]:
    """Best ``count`` exponent-grid points, each with its NNLS-optimal (E, A, B) (weighted by 1/L)."""
    candidates: list[tuple[float, np.ndarray]] = []
    w = 1.0 / loss
    floor = 1e-6 * float(loss.min())  # NNLS may put a coefficient at 0; log needs a positive start
    for alpha in EXPONENT_GRID:
        col_n = np.exp(-alpha * problem.u)
        for beta in EXPONENT_GRID:
            design = np.column_stack([np.ones_like(loss), col_n, np.exp(-beta * problem.v)]) * w[:, None]
            coef, _ = nnls(design, np.ones_like(loss))
            x = np.array([*np.log(np.maximum(coef, floor)), alpha, beta])
            candidates.append((problem.value(x), x))
    candidates.sort(key=lambda item: item[0])
    return [x for _, x in candidates[:count]]


def _bounds(loss: np.ndarray) -> list[tuple[float, float]]:
    top = float(np.log(loss.max())) + 2.0
    return [(top - 40.0, top), (-60.0, 60.0), (-60.0, 60.0), _EXP_BOUNDS, _EXP_BOUNDS]


def _gauss_newton(problem: _Problem, x0: np.ndarray, bounds: list[tuple[float, float]], tol: float = 1e-10,
                  max_iter: int = 100) -> np.ndarray:
    """Levenberg-Marquardt on the Huber objective by iteratively reweighted least squares (weights
    min(1, delta / |r|)); 5x5 solves, a step is taken only when it lowers the objective."""
    lo, hi = np.array(bounds).T
    x = np.clip(x0, lo, hi)
    f = problem.value(x)
    damping = 1e-6
    for _ in range(max_iter):
        r, jac = problem.residuals_and_jacobian(x)
        w = np.minimum(1.0, problem.delta / np.maximum(np.abs(r), 1e-300))
        jtw = jac.T * w
        hess, grad = jtw @ jac, jtw @ r
        diag = np.diag(np.diag(hess) + 1e-12)
        while True:
            x_new = np.clip(x + np.linalg.solve(hess + damping * diag, -grad), lo, hi)
            f_new = problem.value(x_new)
            if f_new <= f or damping > 1e12:
                break
            damping *= 10.0
        if f_new > f:  # no descent direction left: converged as far as doubles allow
            break
        done = np.max(np.abs(x_new - x)) < tol * (1.0 + np.max(np.abs(x)))
        x, f = x_new, f_new
        damping = max(damping / 10.0, 1e-12)
        if done:
            break
    return x


def _to_chinchilla(x: np.ndarray, mu_n: float, mu_t: float, units: Units, provenance: str) -> ChinchillaLoss:
    e, a, b, alpha, beta = (float(v) for v in x)
    # un-centre: exp(a' - alpha (log N - mu_n)) = exp(a' + alpha mu_n) / N**alpha
    return ChinchillaLoss({"E": float(np.exp(e)), "A": float(np.exp(a + alpha * mu_n)),
                           "B": float(np.exp(b + beta * mu_t)), "alpha": alpha, "beta": beta},
                          units=units, provenance=provenance)


def fit_loss_law(params, tokens, loss, units: Units, *, form: str = "chinchilla", delta: float = 1e-3,
                 bootstrap: int = 0, seed: int = 0, starts: int = N_STARTS) -> FitResult:
    """Fit E + A/N**alpha + B/T**beta minimising sum Huber_delta(log L_pred - log L) (see module docstring).

    ``form`` "chinchilla" returns a ChinchillaLoss, "video_dit" the same surface as a VideoDiTLoss.
    ``starts``: how many of the best variable-projection grid points start an L-BFGS + polish run.
    ValueError: fewer than 5 points, one model size, one token budget, non-finite/non-positive values, bad form.
    """
    if form not in LOSS_FORMS:
        raise ValueError(f"fit_loss_law: unknown form {form!r}; expected one of {sorted(LOSS_FORMS)}")
    if starts < 1:
        raise ValueError(f"fit_loss_law: starts={starts!r}; expected >= 1")
    if not delta > 0:
        raise ValueError(f"fit_loss_law: delta={delta!r}; expected > 0 (Chinchilla: 1e-3)")
    cols = columns(params=params, tokens=tokens, loss=loss)
    n_pts = len(cols["loss"])
    if n_pts < 5:
        raise ValueError(f"fit_loss_law: {n_pts} points; at least 5 are needed for 5 constants (E, A, B, alpha, "
                         "beta), and many more for a useful fit")
    require_spread(cols, "fit_loss_law", "A / N**alpha", "B / T**beta")
    log_n = np.log(cols["params"] / units.params_scale)
    log_t = np.log(cols["tokens"] / units.tokens_scale)
    mu_n, mu_t = float(log_n.mean()), float(log_t.mean())
    problem = _Problem(log_n, log_t, cols["loss"], delta, mu_n, mu_t)
    bounds = _bounds(cols["loss"])

    best_x, best_f = None, np.inf
    for x0 in _varpro_starts(problem, cols["loss"], starts):
        # L-BFGS-B finds the basin; a short iteration cap because scipy's L-BFGS-B calls BLAS per iteration,
        # which is slow on a loaded multi-threaded machine, and the Gauss-Newton polish converges faster.
        res = minimize(problem.objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": LBFGS_MAXITER})
        x = _gauss_newton(problem, res.x, bounds, tol=1e-14)
        f = problem.value(x)
        if f < best_f:
            best_x, best_f = x, f

    notes: list[str] = []
    for name, value in (("alpha", best_x[3]), ("beta", best_x[4])):
        if min(abs(value - _EXP_BOUNDS[0]), abs(value - _EXP_BOUNDS[1])) < 1e-6:
            notes.append(f"{name}={value:.4g} at its bound {_EXP_BOUNDS}: the data do not pin it down")
    if np.exp(best_x[0]) < 1e-6 * float(cols["loss"].min()):
        notes.append("E ~ 0 (< 1e-6 of the smallest loss): the runs show no irreducible loss; E is not determined")
    convert = LOSS_FORMS[form]
    provenance = f"fit_loss_law on {n_pts} points (Huber delta={delta:g} on log loss, variable projection + L-BFGS)"
    law = convert(_to_chinchilla(best_x, mu_n, mu_t, units, provenance))

    def refit(idx: np.ndarray) -> np.ndarray | None:
        if len(np.unique(idx)) < 5 or distinct(cols["params"][idx]) < 2 or distinct(cols["tokens"][idx]) < 2:
            return None
        sub = _Problem(log_n[idx], log_t[idx], cols["loss"][idx], delta, mu_n, mu_t)
        x = _gauss_newton(sub, best_x, bounds, BOOTSTRAP_TOL)
        fitted = convert(_to_chinchilla(x, mu_n, mu_t, units, provenance))
        return np.array([fitted.constants[p] for p in fitted.parameters])

    return FitResult(law=law, residual=float(np.sqrt(np.mean(problem.residuals(best_x) ** 2))), n_points=n_pts,
                     bootstrap=bootstrap_rows(refit, n_pts, bootstrap, seed, notes), notes=notes)
