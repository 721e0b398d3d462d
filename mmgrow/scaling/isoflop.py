"""Chinchilla Approach 2 (IsoFLOP profiles): quick allocation exponents, and a known bias.

Per FLOP budget C, fit a parabola of loss in log N, L ~ c0 + c1 log N + c2 (log N)^2, and take its vertex
N_opt(C) = exp(-c1 / (2 c2)), T_opt(C) = C / (6 N_opt); then least squares on logs through the vertices:
log N_opt = const + a log C, log T_opt = const + b log C (a + b = 1 under C = 6 N T).

BIAS WARNING. Along an IsoFLOP line the Chinchilla surface is E + A N^-alpha + B' N^beta, which is not a
parabola in log N unless alpha = beta. On a wide grid, or one not centred on the optimum, the parabola's
vertex is shifted, by an amount that changes with C, so the fitted exponent a is biased even on
noise-free data (Czech et al., arXiv 2603.22339). Prefer :func:`~mmgrow.scaling.fitting.fit_loss_law` (Approach 3,
unbiased on the same data) and use this as a cross-check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from mmgrow.scaling.columns import columns, distinct


@dataclass
class IsoFlopFit:
    a: float            # N_opt ∝ C**a
    b: float            # T_opt ∝ C**b
    minima: list[tuple[float, float, float]]   # (C, N_opt, T_opt) per budget
    notes: list[str] = field(default_factory=list)


def _budget_groups(flops: np.ndarray) -> list[np.ndarray]:
    """Indices of runs per FLOP budget (budgets equal up to 1e-6 relative: 6 N T rounds differently per N)."""
    order = np.argsort(flops)
    groups: list[list[int]] = [[int(order[0])]]
    for prev, cur in pairwise(order):
        if flops[cur] > flops[prev] * (1 + 1e-6):
            groups.append([])
        groups[-1].append(int(cur))
    return [np.array(g) for g in groups]


def isoflop_fit(params, tokens, loss, flops) -> IsoFlopFit:
    """Approach 2 (see the module docstring; biased for alpha != beta on wide / off-centre grids).

    params, tokens, loss, flops: per run, RAW units. Needs >= 2 budgets with >= 3 sizes each; a budget whose
    parabola opens downwards is skipped with a note; a vertex outside the sampled sizes is kept with a note.
    """
    cols = columns(params=params, tokens=tokens, loss=loss, flops=flops)
    notes: list[str] = []
    minima: list[tuple[float, float, float]] = []
    for idx in _budget_groups(cols["flops"]):
        c = float(np.exp(np.mean(np.log(cols["flops"][idx]))))
        if distinct(cols["params"][idx]) < 3:
            notes.append(f"budget {c:.3g}: fewer than 3 model sizes, skipped")
            continue
        log_n = np.log(cols["params"][idx])
        c2, c1, _ = np.polyfit(log_n, cols["loss"][idx], 2)
        if c2 <= 0:
            notes.append(f"budget {c:.3g}: the parabola in log N opens downwards, skipped")
            continue
        vertex = -c1 / (2 * c2)
        if not log_n.min() <= vertex <= log_n.max():
            notes.append(f"budget {c:.3g}: N_opt {np.exp(vertex):.3g} lies outside the sizes tried (extrapolated)")
        n_opt = float(np.exp(vertex))
        minima.append((c, n_opt, c / (6.0 * n_opt)))
    if len(minima) < 2:
        raise ValueError(f"isoflop_fit: {len(minima)} usable FLOP budget(s); >= 2 budgets with >= 3 model sizes "
                         f"each are needed ({'; '.join(notes) or 'one budget given'})")
    log_c = np.log([m[0] for m in minima])
    a = float(np.polyfit(log_c, np.log([m[1] for m in minima]), 1)[0])
    b = float(np.polyfit(log_c, np.log([m[2] for m in minima]), 1)[0])
    return IsoFlopFit(a=a, b=b, minima=minima, notes=notes)
