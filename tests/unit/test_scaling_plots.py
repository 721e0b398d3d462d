"""``mmgrow scaling plot``: the arrays each figure draws (checked against laws evaluated by hand) and the PNGs."""
from __future__ import annotations

import numpy as np
import pytest

from mmgrow.scaling.laws import ChinchillaLoss, PowerLaw
from mmgrow.scaling.plots import (
    batch_law_series,
    loss_vs_batch_series,
    loss_vs_compute_series,
    loss_vs_lr_series,
    lr_law_series,
    plot_scaling,
    sci,
)
from mmgrow.scaling.study import Study, fit_study
from mmgrow.scaling.table import RunTable

# Truth in raw units: lr_opt and batch_opt (tokens) follow power laws, the loss at the optimum is Chinchilla's form.
LR = PowerLaw({"coef": 3e-2, "n_exp": -0.2, "t_exp": -0.05})
BATCH = PowerLaw({"coef": 0.3, "n_exp": 0.2, "t_exp": 0.3})
LOSS = ChinchillaLoss({"E": 1.8, "A": 40.0, "B": 300.0, "alpha": 0.3, "beta": 0.3})
SIZES = (1.05e5, 3.1e5, 8.2e5, 2.1e6)
BUDGETS = (2e7, 5e7, 1e8)
BATCHES = (256.0, 512.0, 1024.0, 2048.0)
LRS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)
NOISE = 1e-4  # multiplicative: small enough for quadratic cell optima, large enough for bootstrap bands of width > 0
PNG = b"\x89PNG\r\n\x1a\n"


def bowl(n, t, lr, b):
    """Loss of one run: Chinchilla at the cell optimum + a tilted quadratic in (log lr, log B) around it."""
    x, y = np.log(lr / LR(n, t)), np.log(b / BATCH(n, t))
    return LOSS(n, t) + 0.02 * x * x + 0.01 * y * y + 0.006 * x * y


def sweep_table() -> RunTable:
    rows = np.array([(n, t, lr, b) for n in SIZES for t in BUDGETS for b in BATCHES for lr in LRS])
    n, t, lr, b = rows.T
    noise = 1 + NOISE * np.random.default_rng(0).standard_normal(len(rows))
    return RunTable(n, t, bowl(n, t, lr, b) * noise, lr, b, names=[f"run{i}" for i in range(len(rows))])


@pytest.fixture(scope="module")
def table() -> RunTable:
    return sweep_table()


@pytest.fixture(scope="module")
def study(table) -> Study:
    return Study.from_dict(fit_study(table, bootstrap=30, seed=1))


def test_sci_formats_like_the_titles():
    assert [sci(v) for v in (1.05e5, 2e9, 2.1e6, 256, 1e-3)] == ["1.05e5", "2e9", "2.1e6", "256", "0.001"]


def test_sweep_series_hold_every_run_sorted_with_the_cell_optimum(table, study):
    series = loss_vs_lr_series(table, study)
    assert sorted(series) == list(SIZES) and all(sorted(series[n]) == list(BUDGETS) for n in SIZES)
    cell = series[3.1e5][5e7]
    assert sorted(cell["lines"]) == list(BATCHES)
    line = cell["lines"][512.0]
    np.testing.assert_array_equal(line["x"], LRS)
    # each drawn loss is that run's bowl value (to the noise)
    np.testing.assert_allclose(line["loss"], bowl(3.1e5, 5e7, np.array(LRS), 512.0), rtol=5 * NOISE)
    lr_opt, loss_opt = cell["optimum"]
    # the star sits at the located optimum, which lies between grid points near the true one
    assert lr_opt == pytest.approx(LR(3.1e5, 5e7), rel=0.03) and loss_opt == pytest.approx(LOSS(3.1e5, 5e7), rel=1e-3)
    assert lr_opt not in LRS

    by_batch = loss_vs_batch_series(table, study)[3.1e5][5e7]
    assert sorted(by_batch["lines"]) == list(LRS)
    np.testing.assert_array_equal(by_batch["lines"][1e-3]["x"], BATCHES)
    assert by_batch["optimum"][0] == pytest.approx(BATCH(3.1e5, 5e7), rel=0.03)
    assert loss_vs_lr_series(table)[3.1e5][5e7]["optimum"] is None  # no study, no stars


def test_law_series_are_the_fitted_law_inside_its_bootstrap_band(study):
    for series_fn, key, truth in ((lr_law_series, "lr_opt", LR), (batch_law_series, "batch_size_opt", BATCH)):
        series = series_fn(study, 0.9)
        assert sorted(series) == list(BUDGETS)
        k = getattr(study, key).law.constants
        # recovered law near the truth: the curves are the sweep's law, not an arbitrary fit
        assert k["n_exp"] == pytest.approx(truth.constants["n_exp"], abs=0.02), key
        for t, s in series.items():
            hand = k["coef"] * s["params"] ** k["n_exp"] * t ** k["t_exp"]  # raw units: scales are 1
            np.testing.assert_allclose(s["fit"], hand, rtol=1e-12)
            assert s["params"].min() < min(SIZES) and s["params"].max() > max(SIZES)
            assert np.all(s["lo"] <= s["fit"] * (1 + 1e-9)) and np.all(s["fit"] <= s["hi"] * (1 + 1e-9)), (key, t)
            assert np.all(s["hi"] > s["lo"])
            cells = [c for c in study.cells if c["tokens"] == t]
            np.testing.assert_array_equal(s["points_params"], [c["params"] for c in cells])
            np.testing.assert_array_equal(s["points"], [c[key] for c in cells])
        # a lower level gives a band inside the 0.9 one
        narrow = series_fn(study, 0.5)[BUDGETS[0]]
        assert np.all(narrow["lo"] >= series[BUDGETS[0]]["lo"]) and np.all(narrow["hi"] <= series[BUDGETS[0]]["hi"])


def test_compute_frontier_is_the_loss_law_at_its_compute_optimal_allocation(table, study):
    series = loss_vs_compute_series(table, study, 0.9)
    np.testing.assert_allclose(series["points"]["flops"], 6 * table.params * table.tokens, rtol=0)
    front = series["frontier"]
    c = front["flops"]
    assert c.min() < 6 * min(SIZES) * min(BUDGETS) and c.max() > 6 * max(SIZES) * max(BUDGETS)
    k = study.loss.law.constants
    a, b = k["alpha"], k["beta"]
    # Chinchilla's closed form, by hand: N_opt = G (C/6)^(b/(a+b)), G = (a A / (b B))^(1/(a+b))
    n_opt = (a * k["A"] / (b * k["B"])) ** (1 / (a + b)) * (c / 6) ** (b / (a + b))
    np.testing.assert_allclose(front["params_opt"], n_opt, rtol=1e-10)
    np.testing.assert_allclose(front["tokens_opt"], c / (6 * n_opt), rtol=1e-10)
    hand = k["E"] + k["A"] / n_opt ** a + k["B"] / (c / (6 * n_opt)) ** b
    np.testing.assert_allclose(front["loss"], hand, rtol=1e-12)
    for factor in (0.7, 1.4):  # any other split of the same C loses more
        assert np.all(study.loss.law(n_opt * factor, c / (6 * n_opt * factor)) > front["loss"])
    assert np.all(front["lo"] <= front["loss"] + 1e-12) and np.all(front["loss"] <= front["hi"] + 1e-12)
    assert np.all(front["hi"] > front["lo"])
    # runs at one fixed (lr, B) lie on or above the cell optima, so their law's frontier lies above
    fixed = series["frontier_fixed"]
    inside = (c >= 6 * min(SIZES) * min(BUDGETS)) & (c <= 6 * max(SIZES) * max(BUDGETS))
    assert np.all(fixed["loss"][inside] > front["loss"][inside])
    assert fixed["lo"] is None


def test_plot_scaling_writes_every_png_the_inputs_allow(table, study, tmp_path):
    paths = plot_scaling(table, study, tmp_path / "all")
    names = ["loss_vs_lr.png", "loss_vs_batch.png", "lr_law.png", "batch_law.png", "loss_vs_compute.png"]
    assert [p.name for p in paths] == names
    for p in paths:
        assert p.parent == tmp_path / "all" and p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000
    # laws only (no runs): the law figures and the frontier over the fitted N, T ranges
    only_study = plot_scaling(None, study, tmp_path / "laws")
    assert [p.name for p in only_study] == ["lr_law.png", "batch_law.png", "loss_vs_compute.png"]
    assert loss_vs_compute_series(None, study)["points"] is None


def test_loss_only_table_gives_only_loss_vs_compute(tmp_path):
    n, t = np.meshgrid(SIZES, BUDGETS, indexing="ij")
    n, t = n.ravel(), t.ravel()
    loss_only = RunTable(n, t, LOSS(n, t), names=[f"r{i}" for i in range(n.size)])
    study = Study.from_dict(fit_study(loss_only, bootstrap=0))
    assert study.lr_opt is None and study.cells == []
    paths = plot_scaling(loss_only, study, tmp_path)
    assert [p.name for p in paths] == ["loss_vs_compute.png"] and paths[0].read_bytes()[:8] == PNG
    series = loss_vs_compute_series(loss_only, study)
    # noise-free runs at the truth: the frontier is the true law's, and without bootstrap there is no band
    truth_n, truth_t = np.array([LOSS.compute_optimal(c) for c in series["frontier"]["flops"]]).T
    np.testing.assert_allclose(series["frontier"]["loss"], LOSS(truth_n, truth_t), rtol=1e-6)
    assert series["frontier"]["lo"] is None and series["frontier_fixed"] is None
    with pytest.raises(ValueError, match="loss-only"):
        loss_vs_lr_series(loss_only)
    assert [p.name for p in plot_scaling(loss_only, None, tmp_path / "runs")] == ["loss_vs_compute.png"]


def test_nothing_drawable_raises(tmp_path):
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_scaling(None, None, tmp_path)
    assert not any(tmp_path.iterdir())
