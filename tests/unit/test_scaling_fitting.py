"""Fitting: log-log power laws, Huber + variable-projection loss-law fit, bootstrap intervals (mmgrow.scaling.fitting)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from mmgrow.scaling.fit_result import FitResult
from mmgrow.scaling.fitting import fit_compute_power_law, fit_loss_law, fit_power_law
from mmgrow.scaling.laws import ChinchillaLoss, ComputePowerLaw, PowerLaw, VideoDiTLoss
from mmgrow.scaling.units import Units

BILLIONS = Units(params_scale=1e9, tokens_scale=1e9, lr_schedule="constant")
CHINCHILLA = ChinchillaLoss({"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28})
VIDEO_LR = PowerLaw({"coef": 0.0002, "n_exp": -0.1619, "t_exp": -0.0453}, BILLIONS)
VIDEO_BATCH = PowerLaw({"coef": 2.1797e4, "n_exp": 0.1906, "t_exp": 0.8080}, BILLIONS)
# the paper's fitting grid: 4 sizes x 5 token budgets
GRID_N = np.repeat([1.7e7, 5.7e7, 1.3e8, 2.6e8], 5)
GRID_T = np.tile([2e9, 4e9, 6e9, 8e9, 12e9], 4)


def isoflop_data(law: ChinchillaLoss, budgets=None, points: int = 16, spread: float = 30.0):
    """vpnls-style synthetic IsoFLOP data: per budget, `points` sizes log-spaced over x/spread..x*spread around
    the law's own compute-optimal N; T = C / (6 N)."""
    n, t = [], []
    for c in np.geomspace(1e17, 1e22, 8) if budgets is None else budgets:
        n_opt, _ = law.compute_optimal(c)
        sizes = n_opt * np.geomspace(1 / spread, spread, points)
        n.extend(sizes)
        t.extend(c / (6 * sizes))
    n, t = np.array(n), np.array(t)
    return n, t, law(n, t)


def assert_constants(law, truth, rel):
    for name, value in truth.constants.items():
        assert law.constants[name] == pytest.approx(value, rel=rel), name


# ---------------------------------------------------------------- noise-free recovery
def test_loss_law_recovers_chinchilla_constants_noise_free():
    n, t, loss = isoflop_data(CHINCHILLA)
    assert len(loss) == 128
    start = time.perf_counter()
    fit = fit_loss_law(n, t, loss, Units())
    elapsed = time.perf_counter() - start
    print(f"fit_loss_law on 128 points: {elapsed:.3f} s; constants {fit.law.constants}")
    assert isinstance(fit.law, ChinchillaLoss) and fit.n_points == 128
    assert_constants(fit.law, CHINCHILLA, rel=1e-3)
    assert fit.residual < 1e-8
    assert elapsed < 3.0  # ~0.2 s alone; generous for a shared 2-core machine


def test_loss_law_epoch_constants_in_billions_as_video_dit_form():
    # a different truth (alpha < beta) and scaled units; the fit returns the video-DiT parametrisation
    truth = ChinchillaLoss({"E": 1.8172, "A": 482.01 / 1e9 ** 0.3478, "B": 2085.43 / 1e9 ** 0.3658,
                            "alpha": 0.3478, "beta": 0.3658}, BILLIONS)
    n, t, loss = isoflop_data(truth, budgets=np.geomspace(1e18, 1e21, 5), points=10, spread=10.0)
    fit = fit_loss_law(n, t, loss, BILLIONS, form="video_dit")
    assert isinstance(fit.law, VideoDiTLoss) and fit.law.units == BILLIONS
    assert_constants(fit.law.to_chinchilla(), truth, rel=1e-3)


def test_power_law_recovers_video_dit_lr_and_batch_laws():
    for truth in (VIDEO_LR, VIDEO_BATCH):
        fit = fit_power_law(GRID_N, GRID_T, truth(GRID_N, GRID_T), BILLIONS)
        assert_constants(fit.law, truth, rel=1e-9)
        assert fit.law.units == BILLIONS and fit.residual < 1e-12
    # raw units: the coefficient changes by 1e9**(n_exp + t_exp), the exponents do not
    fit = fit_power_law(GRID_N, GRID_T, VIDEO_BATCH(GRID_N, GRID_T), Units())
    c = VIDEO_BATCH.constants
    assert fit.law.constants["coef"] == pytest.approx(c["coef"] * 1e9 ** -(c["n_exp"] + c["t_exp"]), rel=1e-9)
    assert fit.law.constants["t_exp"] == pytest.approx(c["t_exp"], rel=1e-9)


def test_compute_power_law_recovers_deepseek():
    truth = ComputePowerLaw({"coef": 0.3118, "c_exp": -0.1250})
    flops = np.geomspace(1e17, 2e19, 9)
    fit = fit_compute_power_law(flops, truth(flops), Units())
    assert_constants(fit.law, truth, rel=1e-9)


# ---------------------------------------------------------------- robustness: why Huber
def test_huber_resists_one_bad_run_where_squares_do_not():
    n, t, loss = isoflop_data(CHINCHILLA, budgets=np.geomspace(1e18, 1e21, 4), points=8, spread=10.0)
    loss = loss.copy()
    loss[5] *= 1.05  # one run 5 % worse (a crashed dataloader, a bad seed)
    huber = fit_loss_law(n, t, loss, Units())
    squares = fit_loss_law(n, t, loss, Units(), delta=10.0)  # delta >> residuals: plain least squares
    err_h = abs(huber.law.constants["alpha"] / 0.34 - 1)
    err_s = abs(squares.law.constants["alpha"] / 0.34 - 1)
    print(f"alpha relative error with one 5% outlier: Huber {err_h:.2e}, squares {err_s:.2e}")
    assert err_h < 1e-3
    assert err_s > 10 * err_h


# ---------------------------------------------------------------- bootstrap
def _coverage_power(reps: int = 40, level: float = 0.9) -> np.ndarray:
    # 6 sizes x 6 budgets: with n = 36 points the percentile bootstrap's small-sample under-coverage
    # (its spread is sqrt((n - 3) / n) of the true one) stays small
    n = np.repeat([1.7e7, 3.2e7, 5.7e7, 9e7, 1.3e8, 2.6e8], 6)
    t = np.tile([2e9, 4e9, 6e9, 8e9, 1e10, 1.2e10], 6)
    hits = np.zeros(3)
    clean = VIDEO_BATCH(n, t)
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        noisy = clean * np.exp(0.005 * rng.standard_normal(len(clean)))  # 0.5 % multiplicative noise
        iv = fit_power_law(n, t, noisy, BILLIONS, bootstrap=200, seed=rep).intervals(level)
        hits += [iv[k][0] <= VIDEO_BATCH.constants[k] <= iv[k][1] for k in VIDEO_BATCH.parameters]
    return hits / reps


def test_power_law_bootstrap_coverage_near_nominal():
    coverage = _coverage_power()
    print(f"power-law 90% bootstrap coverage over 40 noisy repetitions (coef, n_exp, t_exp): {coverage}")
    # binomial(40, 0.9): 0.75..0.99 holds with probability > 0.99
    assert np.all((coverage >= 0.75) & (coverage <= 0.99))


@pytest.mark.slow
def test_loss_law_bootstrap_coverage_near_nominal():
    n, t, clean = isoflop_data(CHINCHILLA, budgets=np.geomspace(1e18, 1e21, 4), points=8, spread=10.0)
    reps, hits = 40, np.zeros(5)
    for rep in range(reps):
        rng = np.random.default_rng(2000 + rep)
        noisy = clean * np.exp(0.005 * rng.standard_normal(len(clean)))
        # one start keeps 40 repetitions affordable (the multi-start is tested above)
        iv = fit_loss_law(n, t, noisy, Units(), bootstrap=30, seed=rep, starts=1).intervals(0.9)
        hits += [iv[k][0] <= CHINCHILLA.constants[k] <= iv[k][1] for k in CHINCHILLA.parameters]
    coverage = hits / reps
    print(f"loss-law 90% bootstrap coverage (E, A, B, alpha, beta): {coverage}")
    assert np.all((coverage >= 0.75) & (coverage <= 0.99))


def test_bootstrap_intervals_predictions_and_roundtrip():
    rng = np.random.default_rng(7)
    noisy = VIDEO_LR(GRID_N, GRID_T) * np.exp(0.005 * rng.standard_normal(len(GRID_N)))
    fit = fit_power_law(GRID_N, GRID_T, noisy, BILLIONS, bootstrap=100, seed=3)
    assert fit.bootstrap.shape == (100, 3)
    iv = fit.intervals(0.9)
    lo, hi = iv["n_exp"]
    assert lo < fit.law.constants["n_exp"] < hi and hi - lo < 0.05
    p_lo, p_hi = fit.predict_interval(lambda law: law(1.07e9, 1e10), 0.9)
    assert p_lo < fit.law(1.07e9, 1e10) < p_hi
    # same seed -> same refits; to_dict/from_dict keeps everything unrounded
    again = fit_power_law(GRID_N, GRID_T, noisy, BILLIONS, bootstrap=100, seed=3)
    np.testing.assert_array_equal(again.bootstrap, fit.bootstrap)
    back = FitResult.from_dict(fit.to_dict())
    assert back.law.constants == fit.law.constants and back.residual == fit.residual
    np.testing.assert_array_equal(back.bootstrap, fit.bootstrap)
    assert back.intervals(0.9) == iv
    # no bootstrap: no intervals, and no invented ones
    plain = fit_power_law(GRID_N, GRID_T, noisy, BILLIONS)
    assert plain.intervals() == {}
    with pytest.raises(ValueError, match="bootstrap"):
        plain.predict_interval(lambda law: law(1e9, 1e10))
    assert FitResult.from_dict(plain.to_dict()).bootstrap.size == 0


def test_loss_law_bootstrap_rows_in_returned_form_order():
    n, t, loss = isoflop_data(CHINCHILLA, budgets=np.geomspace(1e18, 1e21, 4), points=8, spread=10.0)
    noisy = loss * np.exp(0.005 * np.random.default_rng(1).standard_normal(len(loss)))
    fit = fit_loss_law(n, t, noisy, Units(), form="video_dit", bootstrap=10, seed=0)
    assert fit.bootstrap.shape == (10, 5)
    laws = fit.bootstrap_laws()
    assert all(isinstance(law, VideoDiTLoss) for law in laws)
    alphas = fit.bootstrap[:, VideoDiTLoss.parameters.index("alpha_N")]
    assert np.all(np.abs(alphas - 0.34) < 0.05)


# ---------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_problem():
    n, t, loss = isoflop_data(CHINCHILLA, budgets=np.geomspace(1e18, 1e21, 3), points=4, spread=10.0)
    bad = loss.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"'loss': row 3 is nan"):
        fit_loss_law(n, t, bad, Units())
    bad[3] = -1.0
    with pytest.raises(ValueError, match=r"'loss': row 3 is -1.0"):
        fit_loss_law(n, t, bad, Units())
    with pytest.raises(ValueError, match="one model size"):
        fit_loss_law(np.full_like(n, 1e9), t, loss, Units())
    with pytest.raises(ValueError, match="one token budget"):
        fit_loss_law(n, np.full_like(t, 1e10), loss, Units())
    with pytest.raises(ValueError, match="4 points; at least 5"):
        fit_loss_law(n[:4], t[:4], loss[:4], Units())
    with pytest.raises(ValueError, match="unknown form 'kaplan'"):
        fit_loss_law(n, t, loss, Units(), form="kaplan")
    with pytest.raises(ValueError, match="different lengths"):
        fit_loss_law(n, t[:-1], loss, Units())
    with pytest.raises(ValueError, match="one model size"):
        fit_power_law(np.full(4, 1e8), [1e9, 2e9, 3e9, 4e9], [1.0, 2.0, 3.0, 4.0], Units())
    with pytest.raises(ValueError, match="one token budget"):
        fit_power_law([1e8, 2e8, 3e8], np.full(3, 1e9), [1.0, 2.0, 3.0], Units())
    with pytest.raises(ValueError, match="vary together"):
        fit_power_law([1e8, 2e8, 4e8], [1e9, 2e9, 4e9], [1.0, 2.0, 3.0], Units())
    with pytest.raises(ValueError, match=r"'y': row 1"):
        fit_power_law(GRID_N[:3], GRID_T[:3], [1.0, 0.0, 2.0], Units())
    with pytest.raises(ValueError, match="one compute budget"):
        fit_compute_power_law([1e18, 1e18], [1.0, 2.0], Units())


def test_no_irreducible_term_is_noted():
    # Kaplan-like data with E = 0: the fit still matches the surface and says E is not determined
    truth = ChinchillaLoss({"E": 0.0, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28})
    n, t, loss = isoflop_data(truth, budgets=np.geomspace(1e18, 1e21, 4), points=8, spread=10.0)
    fit = fit_loss_law(n, t, loss, Units())
    assert fit.law.constants["E"] < 1e-9 * loss.min()
    assert fit.law.constants["alpha"] == pytest.approx(0.34, rel=1e-3)
    assert any("irreducible" in note for note in fit.notes)
