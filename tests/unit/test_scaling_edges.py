"""Review additions: spreadsheet CSVs (byte-order mark), shifted CSV rows, and cell optima stuck on the grid edge."""

import numpy as np
import pytest

from mmgrow.scaling.study import fit_study
from mmgrow.scaling.table import RunTable, load_runs
from mmgrow.scaling.units import Units

SIZES, BUDGETS = (1e6, 3e6, 1e7, 3e7), (1e8, 3e8, 1e9)


def test_a_csv_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_bytes("\ufeffparams,tokens,loss\n1e5,1e6,0.5\n2e5,2e6,0.4\n".encode())
    t = load_runs(path)
    assert t.params.tolist() == [1e5, 2e5] and t.loss.tolist() == [0.5, 0.4]
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_bytes('\ufeff{"params": 1e5, "tokens": 1e6, "loss": 0.5}\n'.encode())
    assert load_runs(jsonl).tokens.tolist() == [1e6]


def test_a_csv_row_with_more_values_than_the_header_is_an_error(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("params,tokens,loss\n1e5,1e6,0.5\n2e5,2e6,0.4,9\n")
    with pytest.raises(ValueError, match=r"line 3 has 4 values for 3 header columns \(params, tokens, loss\)"):
        load_runs(path)


def _table(lr_of, batch_of, lrs, batches):
    """Bowls in (log lr, log B) around known optima; ``lrs``/``batches`` map (N, T) to that cell's grid."""
    rows = []
    for n in SIZES:
        for t in BUDGETS:
            lo, bo = np.log(lr_of(n, t)), np.log(batch_of(n, t))
            best = 1.7 + 400 / n**0.34 + 410 / t**0.28
            for lr in lrs(n, t):
                for b in batches(n, t):
                    rows.append((n, t, lr, b, best * (1 + 0.01 * (np.log(lr) - lo) ** 2 + 0.005 * (np.log(b) - bo) ** 2)))
    a = np.array(rows).T
    return RunTable(a[0], a[1], a[4], a[2], a[3], None, [f"r{i}" for i in range(a.shape[1])], Units(), [], [], "synth")


def test_optima_on_the_grid_edge_are_named_in_the_warnings():
    # One fixed grid for every cell: lr_opt = 0.3 N^-0.3 T^-0.05 runs past the largest lr (1.6e-3) for N = 1e6 only;
    # B_opt = N^0.1 T^0.3 (1e3 .. 2.8e3 tokens) lies below the whole batch grid (1e4 .. 1e5) in every cell.
    lrs, batches = np.array([1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]), np.array([1e4, 3e4, 1e5])
    study = fit_study(_table(lambda n, t: 0.3 * n**-0.3 * t**-0.05, lambda n, t: n**0.1 * t**0.3,
                             lambda n, t: lrs, lambda n, t: batches), bootstrap=0)
    edge = {(c["params"], c["tokens"]): c["at_edge"] for c in study["cells"]}
    assert edge == {(n, t): (["lr", "batch_size"] if n == 1e6 else ["batch_size"]) for n in SIZES for t in BUDGETS}
    warnings = study["data"]["warnings"]
    assert any(w.startswith("lr: 3 of 12 cell optima sit on the edge") for w in warnings)
    assert any(w.startswith("batch_size: 12 of 12 cell optima sit on the edge") for w in warnings)
    # what the warning protects against: the batch law through edge values is flat (B = 1e4, exponents 0)
    b = study["batch_size_opt"]["law"]["constants"]
    assert b["coef"] == pytest.approx(1e4, rel=1e-9) and abs(b["n_exp"]) < 1e-9 and abs(b["t_exp"]) < 1e-9


def test_grids_around_the_optimum_raise_no_edge_warning_and_recover_the_laws():
    lr_of, batch_of = (lambda n, t: 2e-2 * n**-0.2 * t**-0.05), (lambda n, t: 1e2 * n**0.1 * t**0.3)
    # Each cell's grid straddles its optimum off-centre, so the minimum falls between grid points.
    study = fit_study(_table(lr_of, batch_of, lambda n, t: lr_of(n, t) * np.exp(np.linspace(-1.2, 1.2, 5) + 0.3),
                             lambda n, t: batch_of(n, t) * np.exp(np.linspace(-1, 1, 4) - 0.2)), bootstrap=0)
    assert all(c["at_edge"] == [] for c in study["cells"]) and not any("edge" in w for w in study["data"]["warnings"])
    lr = study["lr_opt"]["law"]["constants"]
    assert [lr["coef"], lr["n_exp"], lr["t_exp"]] == pytest.approx([2e-2, -0.2, -0.05], rel=1e-3)


def test_fixed_hyperparameters_missing_from_some_cells_are_warned_about():
    lr_of, batch_of = (lambda n, t: 2e-2 * n**-0.2 * t**-0.05), (lambda n, t: 1e2 * n**0.1 * t**0.3)
    # grids centred on each cell's optimum: no (lr, batch) pair is shared, so the "fixed" pair is in one cell only
    study = fit_study(_table(lr_of, batch_of, lambda n, t: lr_of(n, t) * np.exp(np.linspace(-1, 1, 3)),
                             lambda n, t: batch_of(n, t) * np.exp(np.linspace(-1, 1, 3))), bootstrap=0)
    assert study["fixed_hparams"]["cells"] == 1 and study["fixed_hparams"]["runs"] == 1
    assert study["loss_fixed_hparams"] is None
    assert any("were run in 1 of 12 cells" in w for w in study["data"]["warnings"])


def test_fixed_hyperparameters_count_cells_not_repeated_runs():
    lrs, batches = np.array([1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]), np.array([1e4, 3e4, 1e5])
    table = _table(lambda n, t: 0.3 * n**-0.3 * t**-0.05 / 3, lambda n, t: 3e4, lambda n, t: lrs, lambda n, t: batches)
    dup = (lambda a: np.r_[a, a])  # every run twice (two seeds)
    twice = RunTable(dup(table.params), dup(table.tokens), dup(table.loss), dup(table.lr), dup(table.batch_size),
                     None, table.names + [f"{n}-s1" for n in table.names], Units(), [], [], "synth")
    study = fit_study(twice, bootstrap=0, fixed_lr=4e-4, fixed_batch_size=3e4)
    assert study["fixed_hparams"] == {"lr": 4e-4, "batch_size": 3e4, "cells": 12, "runs": 24}
    assert not any("were run in" in w for w in study["data"]["warnings"])


def test_subset_keeps_names_with_their_rows_for_masks_and_index_arrays():
    t = RunTable(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0]), np.array([0.3, 0.2, 0.1]),
                 names=["a", "b", "c"])
    by_mask = t.subset(np.array([True, False, True]))
    assert by_mask.names == ["a", "c"] and by_mask.params.tolist() == [1.0, 3.0] and by_mask.lr is None
    by_index = t.subset(np.array([2, 0, 2]))
    assert by_index.names == ["c", "a", "c"] and by_index.loss.tolist() == [0.1, 0.3, 0.1]


def test_a_run_diverged_on_its_gradient_names_the_parameter(tmp_path):
    import json

    for name, diverged in (("grad", {"step": 12, "loss_name": "gradient", "value": None, "parameter": "blocks.0.w"}),
                           ("loss", {"step": 3, "loss_name": "train/loss", "value": "inf", "parameter": None}),
                           ("ok", None)):
        (tmp_path / name).mkdir()
        summary = {"status": "diverged" if diverged else "complete", "diverged": diverged,
                   "non_embedding_parameters": 1000, "tokens_seen": 512, "final_val_loss": 0.5}
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    reasons = {e["run"]: e["reason"] for e in load_runs(tmp_path).excluded}
    assert reasons == {"grad": "diverged at step 12 (gradient of blocks.0.w is non-finite); kept out of the fits",
                       "loss": "diverged at step 3 (train/loss = inf); kept out of the fits"}
