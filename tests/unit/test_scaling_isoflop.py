"""Chinchilla Approach 2 (IsoFLOP parabolas): exact where it should be, biased where the literature says."""
from __future__ import annotations

import numpy as np
import pytest

from mmgrow.scaling.fitting import fit_loss_law
from mmgrow.scaling.isoflop import isoflop_fit
from mmgrow.scaling.laws import ChinchillaLoss
from mmgrow.scaling.units import Units

BUDGETS = np.geomspace(1e17, 1e22, 8)


def isoflop_grid(law, lo: float, hi: float, centre=None, points: int = 16):
    """Per budget, `points` sizes log-spaced over centre(C) * [lo, hi]; T = C / (6 N)."""
    n, t, c = [], [], []
    for budget in BUDGETS:
        mid = law.compute_optimal(budget)[0] if centre is None else centre(budget)
        sizes = mid * np.geomspace(lo, hi, points)
        n.extend(sizes)
        t.extend(budget / (6 * sizes))
        c.extend([budget] * points)
    n, t, c = map(np.array, (n, t, c))
    return n, t, law(n, t), c


def twenty_tokens_per_param(budget):
    """The usual guess for centring a sweep: D = 20 N, so N = sqrt(C / 120) (exponent 0.5, not the truth)."""
    return np.sqrt(budget / 120.0)


def test_exact_on_a_parabola_in_log_n():
    # loss exactly quadratic in log N around N_opt(C) = 0.1 C^0.45: vertices and exponents are exact
    n, c, loss = [], [], []
    for budget in BUDGETS[:4]:
        n_opt = 0.1 * budget ** 0.45
        sizes = n_opt * np.geomspace(0.2, 3.0, 7)
        n.extend(sizes)
        c.extend([budget] * 7)
        loss.extend(2.0 + 0.05 * np.log(sizes / n_opt) ** 2)
    n, c = np.array(n), np.array(c)
    fit = isoflop_fit(n, c / (6 * n), loss, c)
    assert fit.a == pytest.approx(0.45, rel=1e-9) and fit.b == pytest.approx(0.55, rel=1e-9)
    assert fit.minima[0][1] == pytest.approx(0.1 * 1e17 ** 0.45, rel=1e-9)
    assert fit.notes == []


def test_approach2_biased_on_wide_off_centre_grid_while_parametric_fit_is_not():
    truth = ChinchillaLoss({"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28})
    a_true = 0.28 / (0.34 + 0.28)
    # a wide grid (x1000 in N) centred off the optimum: 1/300 .. 3 times the 20-tokens-per-parameter guess,
    # whose drift from the true optimum (exponent 0.5 vs 0.4516) changes the offset with C
    n, t, loss, c = isoflop_grid(truth, 1 / 300, 3.0, centre=twenty_tokens_per_param)
    approach2 = isoflop_fit(n, t, loss, c)
    law = fit_loss_law(n, t, loss, Units()).law.constants
    a_param = law["beta"] / (law["alpha"] + law["beta"])
    print(f"a true {a_true:.5f}; Approach 2 {approach2.a:.5f} (error {approach2.a - a_true:+.4f}); "
          f"parametric {a_param:.6f}")
    assert approach2.a - a_true > 0.01  # measured +0.0177 (3.9 % relative) on noise-free data
    assert a_param == pytest.approx(a_true, rel=1e-3)
    assert approach2.a + approach2.b == pytest.approx(1.0, abs=1e-9)  # C = 6 N T holds for every vertex


def test_approach2_unbiased_when_alpha_equals_beta_or_grid_tracks_optimum():
    # controls: the same off-centre grid with alpha == beta, and the alpha != beta law on a grid centred on
    # its own optimum, both give the exact exponent: the bias needs alpha != beta AND a drifting offset
    equal = ChinchillaLoss({"E": 1.69, "A": 406.4, "B": 600.0, "alpha": 0.31, "beta": 0.31})
    n, t, loss, c = isoflop_grid(equal, 1 / 300, 3.0, centre=twenty_tokens_per_param)
    assert isoflop_fit(n, t, loss, c).a == pytest.approx(0.5, abs=1e-9)
    truth = ChinchillaLoss({"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28})
    n, t, loss, c = isoflop_grid(truth, 1 / 30, 30.0)
    assert isoflop_fit(n, t, loss, c).a == pytest.approx(0.28 / 0.62, abs=1e-9)


def test_bad_budgets_are_noted_or_rejected():
    truth = ChinchillaLoss({"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28})
    n, t, loss, c = isoflop_grid(truth, 1 / 10, 10.0, points=5)
    # one budget with only 2 sizes is skipped with a note, the rest still fit
    keep = ~((c == BUDGETS[0]) & (np.arange(len(c)) % 5 > 1))
    fit = isoflop_fit(n[keep], t[keep], loss[keep], c[keep])
    assert len(fit.minima) == 7 and any("fewer than 3 model sizes" in note for note in fit.notes)
    with pytest.raises(ValueError, match="1 usable FLOP budget"):
        first = c == BUDGETS[0]
        isoflop_fit(n[first], t[first], loss[first], c[first])
    bad = loss.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match=r"'loss': row 2 is nan"):
        isoflop_fit(n, t, bad, c)
