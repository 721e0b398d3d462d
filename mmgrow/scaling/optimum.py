"""The optimum of one (N, T) cell of a learning-rate x batch-size grid, located BETWEEN grid points.

The best run of a grid is off the true optimum by up to half a grid step (a factor ~1.2 in lr on a x1.5
grid); fitting hyperparameter laws through best cells inherits that staircase. Instead, near the optimum
the loss is a bowl in (log lr, log B) (Yin et al. 2024; McCandlish et al. 2018), so :func:`cell_optimum` fits

    L(x, y) = c0 + c1 x + c2 y + c3 x^2 + c4 x y + c5 y^2,   x = log lr, y = log B,

to the best run and its grid neighbours, and takes the vertex (solve grad L = 0) when the Hessian
[[2 c3, c4], [c4, 2 c5]] is positive definite and the vertex lies inside the grid's range. Fallbacks, each
with a note saying why: a parabola in log lr at the best run's batch size ("quadratic_lr"), then the best
run itself ("best_cell"). :func:`near_optimal_band` is DeepSeek's band (runs within 0.25 % of the best).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmgrow.scaling.columns import columns


@dataclass
class CellOptimum:
    """The optimum of one (N, T) cell of a learning-rate x batch-size grid."""

    lr: float
    batch_size: float
    loss: float          # the fitted surface at the optimum (or the best run's loss)
    method: str          # "quadratic" | "quadratic_lr" (batch fixed at best) | "best_cell"
    best_run: int        # index (into the arrays passed) of the lowest-loss run
    near_optimal: list[int]   # indices of runs within `band` of the best loss
    notes: list[str] = field(default_factory=list)


def near_optimal_band(loss, band: float = 0.0025) -> np.ndarray:
    """Boolean mask: loss <= min(loss) * (1 + band) (DeepSeek: within 0.25 %)."""
    if not band >= 0:
        raise ValueError(f"near_optimal_band: band={band!r}; expected a fraction >= 0 (DeepSeek: 0.0025)")
    values = columns(loss=loss)["loss"]
    return values <= values.min() * (1.0 + band)


def _levels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct grid values (in log) and each run's index into them (equal up to 1e-9 relative)."""
    logs = np.log(values)
    levels = np.unique(np.round(logs, 9))
    return levels, np.searchsorted(levels, np.round(logs, 9))


def _window(index: np.ndarray, centre: int, count: int, radius: int) -> np.ndarray:
    """Mask of runs whose level index is within `radius` of `centre`, the window shifted inward at an edge."""
    lo = max(0, min(centre - radius, count - 1 - 2 * radius))
    return (index >= lo) & (index <= lo + 2 * radius)


def _quadratic_2d(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, float, float] | str:
    """Vertex (x, y, L) of the least-squares quadric, or the reason it is not a usable minimum."""
    design = np.column_stack([np.ones_like(x), x, y, x * x, x * y, y * y])
    if np.linalg.matrix_rank(design) < 6:
        return "the neighbouring runs do not determine a quadratic (rank < 6)"
    c = np.linalg.lstsq(design, z, rcond=None)[0]
    hess = np.array([[2 * c[3], c[4]], [c[4], 2 * c[5]]])
    if np.any(np.linalg.eigvalsh(hess) <= 0):
        return "the fitted quadratic is not a bowl (Hessian not positive definite)"
    vx, vy = np.linalg.solve(hess, -c[1:3])
    value = c[0] + c[1] * vx + c[2] * vy + c[3] * vx * vx + c[4] * vx * vy + c[5] * vy * vy
    return float(vx), float(vy), float(value)


def _quadratic_1d(x: np.ndarray, z: np.ndarray) -> tuple[float, float] | str:
    """Vertex (x, L) of the least-squares parabola, or the reason it is not a usable minimum."""
    if len(np.unique(x)) < 3:
        return "fewer than 3 learning rates at the best batch size"
    c2, c1, c0 = np.polyfit(x, z, 2)
    if c2 <= 0:
        return "the parabola in log lr opens downwards"
    vx = -c1 / (2 * c2)
    return float(vx), float(c0 + c1 * vx + c2 * vx * vx)


def _too_deep(vertex: float, best: float) -> str:
    return (f"its minimum {vertex:.4g} lies {100 * (1 - vertex / best):.1f} % below the best run's {best:.4g}: "
            "noise, not a bowl")


def cell_optimum(lr, batch_size, loss, *, band: float = 0.0025, radius: int = 1,
                 max_drop: float = 0.02) -> CellOptimum:
    """Locate a cell's optimum between grid points (see the module docstring).

    lr, batch_size (tokens per step) and loss are per-run arrays of one (N, T) cell. The quadratic uses the
    runs within ``radius`` grid steps of the best one (a 3 x 3 block for radius 1; one step wider when that
    holds < 6 runs); the vertex must lie inside the whole grid's (lr, B) range. A larger radius averages more
    noise but assumes the bowl is quadratic further out. Noise-free bowl data -> optimum to 1e-3 relative
    (exact for a quadric). A vertex whose loss lies more than ``max_drop`` (relative) below the best run's is
    rejected too: between neighbouring grid points a real bowl cannot dip that far, a quadric fitted through
    noisy runs can (the loss of a run in a short training budget varies by several percent with its lr).
    """
    if radius < 1:
        raise ValueError(f"cell_optimum: radius={radius!r}; expected >= 1 grid step")
    cols = columns(lr=lr, batch_size=batch_size, loss=loss)
    x, y, z = np.log(cols["lr"]), np.log(cols["batch_size"]), cols["loss"]
    best = int(np.argmin(z))
    near = [int(i) for i in np.flatnonzero(near_optimal_band(z, band))]
    lr_levels, lr_index = _levels(cols["lr"])
    b_levels, b_index = _levels(cols["batch_size"])
    notes: list[str] = []

    def inside(vx: float, vy: float | None = None) -> bool:
        ok_x = x.min() - 1e-12 <= vx <= x.max() + 1e-12
        return ok_x and (vy is None or y.min() - 1e-12 <= vy <= y.max() + 1e-12)

    # 1. quadratic in (log lr, log B) around the best run
    if len(lr_levels) >= 3 and len(b_levels) >= 3:
        for r in (radius, radius + 1):
            mask = _window(lr_index, lr_index[best], len(lr_levels), r) \
                & _window(b_index, b_index[best], len(b_levels), r)
            if mask.sum() >= 6:
                break
        result = _quadratic_2d(x[mask], y[mask], z[mask]) if mask.sum() >= 6 else \
            f"only {int(mask.sum())} runs around the best one (6 needed)"
        if isinstance(result, tuple) and not inside(result[0], result[1]):
            result = (f"the quadratic's minimum (lr {np.exp(result[0]):.3g}, batch {np.exp(result[1]):.3g}) "
                      "lies outside the grid: extend the grid")
        if isinstance(result, tuple) and result[2] < z[best] * (1.0 - max_drop):
            result = _too_deep(result[2], z[best])
        if isinstance(result, tuple):
            return CellOptimum(float(np.exp(result[0])), float(np.exp(result[1])), result[2], "quadratic", best,
                               near, notes)
        notes.append(f"2-D quadratic rejected: {result}")
    else:
        notes.append(f"2-D quadratic needs >= 3 learning rates and >= 3 batch sizes "
                     f"(have {len(lr_levels)} and {len(b_levels)})")

    # 2. parabola in log lr at the best run's batch size
    same_b = b_index == b_index[best]
    window = same_b & _window(lr_index, lr_index[best], len(lr_levels), radius)
    if len(np.unique(lr_index[window])) < 3:
        window = same_b
    result = _quadratic_1d(x[window], z[window])
    if isinstance(result, tuple) and not inside(result[0]):
        result = f"the parabola's minimum (lr {np.exp(result[0]):.3g}) lies outside the grid: extend the grid"
    if isinstance(result, tuple) and result[1] < z[best] * (1.0 - max_drop):
        result = _too_deep(result[1], z[best])
    if isinstance(result, tuple):
        return CellOptimum(float(np.exp(result[0])), float(cols["batch_size"][best]), result[1], "quadratic_lr",
                           best, near, notes)
    notes.append(f"1-D quadratic in log lr rejected: {result}")

    # 3. the best run itself
    notes.append("using the best run (optimum not located between grid points)")
    return CellOptimum(float(cols["lr"][best]), float(cols["batch_size"][best]), float(z[best]), "best_cell", best,
                       near, notes)
