"""Runs -> laws.json -> predictions on synthetic sweeps with known laws, and the command line."""

import json
import math

import numpy as np
import pytest

from mmgrow.__main__ import main
from mmgrow.scaling.fitting import fit_loss_law
from mmgrow.scaling.laws import ChinchillaLoss, PowerLaw
from mmgrow.scaling.study import Study, fit_study, predict, read_laws, write_laws
from mmgrow.scaling.table import RunTable
from mmgrow.scaling.units import Units

LR_LAW = PowerLaw({"coef": 0.05, "n_exp": -0.3, "t_exp": -0.05})
BATCH_LAW = PowerLaw({"coef": 0.02, "n_exp": 0.2, "t_exp": 0.6})
LOSS = ChinchillaLoss({"E": 0.3, "A": 40.0, "B": 300.0, "alpha": 0.35, "beta": 0.4})
SIZES = (1e5, 3e5, 1e6, 3e6)
BUDGETS = (1e6, 3e6, 1e7)


def synthetic_table(sizes=SIZES, budgets=BUDGETS) -> RunTable:
    """Every (N, T) cell: a 7 x 7 lr x batch grid (x2 steps) whose loss is a quadratic bowl in (log lr, log B)
    with its minimum LOSS(N, T) at (LR_LAW, BATCH_LAW) -- between grid points, since the grid is fixed."""
    lrs = 5e-5 * 2.0 ** np.arange(7)
    batches = 128.0 * 2.0 ** np.arange(7)
    rows = []
    for n in sizes:
        for t in budgets:
            lr_opt, b_opt, l_opt = LR_LAW(n, t), BATCH_LAW(n, t), LOSS(n, t)
            for lr in lrs:
                for b in batches:
                    x, y = math.log(lr / lr_opt), math.log(b / b_opt)
                    rows.append((n, t, lr, b, l_opt * (1 + 0.02 * x * x + 0.01 * x * y + 0.015 * y * y)))
    a = np.array(rows)
    return RunTable(params=a[:, 0], tokens=a[:, 1], lr=a[:, 2], batch_size=a[:, 3], loss=a[:, 4],
                    names=[f"r{i}" for i in range(len(a))], units=Units(lr_schedule="constant"), source="synthetic")


@pytest.fixture(scope="module")
def study():
    return fit_study(synthetic_table(), bootstrap=20, radius=2)


def test_noise_free_sweep_recovers_the_laws_through_cell_optima_between_grid_points(study):
    assert all(c["method"] == "quadratic" for c in study["cells"]) and len(study["cells"]) == 12
    for key, truth in (("lr_opt", LR_LAW), ("batch_size_opt", BATCH_LAW), ("loss", LOSS)):
        got = study[key]["law"]["constants"]
        for name, value in truth.constants.items():
            assert got[name] == pytest.approx(value, rel=1e-3), (key, name)
    assert study["units"]["lr_schedule"] == "constant" and study["data"]["rows"] == 12 * 49


def test_fixed_hyperparameter_law_is_the_loss_law_of_one_grid_pair(study):
    table = synthetic_table()
    pair = (study["fixed_hparams"]["lr"], study["fixed_hparams"]["batch_size"])
    assert pair == (4e-4, 1024.0)  # present in every cell; the middle of the 7 x 7 grid (log scale)
    sel = (table.lr == pair[0]) & (table.batch_size == pair[1])
    direct = fit_loss_law(table.params[sel], table.tokens[sel], table.loss[sel], table.units)
    for name, value in direct.law.constants.items():
        assert study["loss_fixed_hparams"]["law"]["constants"][name] == pytest.approx(value, rel=1e-9)
    forced = fit_study(table, bootstrap=0, fixed_lr=1e-4, fixed_batch_size=256)
    assert (forced["fixed_hparams"]["lr"], forced["fixed_hparams"]["batch_size"]) == (1e-4, 256.0)
    with pytest.raises(ValueError, match="no run has lr=0.5"):
        fit_study(table, bootstrap=0, fixed_lr=0.5)


def test_laws_file_round_trip_and_predictions_equal_the_laws(study, tmp_path):
    path = write_laws(tmp_path / "laws.json", study)
    laws = read_laws(path)
    n, t = 2e6, 5e6
    p = predict(laws, params=n, tokens=t)
    assert p["lr_opt"] == pytest.approx(LR_LAW(n, t), rel=1e-3)
    assert p["batch_size_opt"] == pytest.approx(BATCH_LAW(n, t), rel=1e-3)
    assert p["loss"] == pytest.approx(LOSS(n, t), rel=1e-3)
    for key in ("lr_opt", "batch_size_opt", "loss"):
        lo, hi = p["intervals"][key]
        assert lo <= p[key] * (1 + 1e-6) and p[key] <= hi * (1 + 1e-6)
    c = 1e18
    q = predict(laws, flops=c)
    n_opt, t_opt = LOSS.compute_optimal(c)
    assert q["params_opt"] == pytest.approx(n_opt, rel=1e-3) and q["tokens_opt"] == pytest.approx(t_opt, rel=1e-3)
    assert q["lr_opt"] == pytest.approx(LR_LAW(n_opt, t_opt), rel=2e-3)
    assert any("outside the fitted range" in w for w in q["warnings"])  # 1e18 FLOPs is far beyond the sweep


def test_loss_only_tables_and_unfittable_data():
    table = synthetic_table()
    best = {}
    for n, t, loss in zip(table.params, table.tokens, table.loss):
        best[(n, t)] = min(best.get((n, t), np.inf), loss)
    keys = sorted(best)
    loss_only = RunTable(params=np.array([k[0] for k in keys]), tokens=np.array([k[1] for k in keys]),
                         loss=np.array([best[k] for k in keys]), names=[str(k) for k in keys], source="best")
    s = fit_study(loss_only, bootstrap=0)
    assert s["lr_opt"] is None and s["cells"] == [] and s["loss"] is not None
    with pytest.raises(ValueError, match="no law could be fitted: lr_opt not fitted: .*one model size"):
        fit_study(synthetic_table(sizes=(1e5,)), bootstrap=0)
    two = fit_study(synthetic_table(sizes=(1e5, 1e6), budgets=(1e6, 1e7)), bootstrap=0, radius=2)
    assert two["lr_opt"] is not None and two["loss"] is None  # 4 cells: power laws yes, 5 loss constants no
    assert any("loss not fitted: fit_loss_law: 4 points" in w for w in two["data"]["warnings"])


def test_read_laws_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an mmgrow laws file"):
        read_laws(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="mmgrow scaling fit"):
        read_laws(tmp_path / "missing.json")
    assert isinstance(Study.from_dict({"mmgrow_scaling": 1}), Study)


def test_command_line_fit_and_predict(tmp_path, capsys):
    table = synthetic_table(budgets=(1e6, 3e6))
    csv = tmp_path / "runs.csv"
    lines = ["params,tokens,lr,batch_size,loss"] + [",".join(repr(float(v)) for v in row) for row in
                                                    zip(table.params, table.tokens, table.lr, table.batch_size,
                                                        table.loss)]
    csv.write_text("\n".join(lines) + "\n")
    laws = tmp_path / "laws.json"
    assert main(["scaling", "fit", str(csv), "--out", str(laws), "--bootstrap", "10", "--radius", "2"]) == 0
    out = capsys.readouterr().out
    assert "lr_opt: y = " in out and "90% bootstrap intervals" in out and f"wrote {laws}" in out
    assert main(["scaling", "predict", str(laws), "--params", "1e6", "--tokens", "2e6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"lr_opt", "batch_size_opt", "loss", "intervals", "units", "warnings"} <= set(result)
    assert result["lr_opt"] == pytest.approx(LR_LAW(1e6, 2e6), rel=1e-3)
    assert main(["scaling", "predict", str(laws), "--flops", "1e14", "--json"]) == 0
    by_flops = json.loads(capsys.readouterr().out)
    assert by_flops["params_opt"] * by_flops["tokens_opt"] * 6 == pytest.approx(1e14, rel=1e-9)
    assert main(["scaling", "predict", str(laws), "--params", "1e6"]) == 2
    assert "give --params and --tokens" in capsys.readouterr().err
    assert main(["scaling", "predict", str(laws), "--params", "-1", "--tokens", "2e6"]) == 2
    assert main(["scaling", "frobnicate"]) == 2
    assert "unknown scaling subcommand 'frobnicate'" in capsys.readouterr().err
