"""Runs in: run-directory trees (summary.json + a sweep's scaling.json budgets), CSV and JSONL, and bad input."""

import json

import numpy as np
import pytest

from mmgrow.scaling.table import load_runs
from mmgrow.scaling.units import UnitMismatchError


def _run(root, name, *, params=1000, lr=1e-3, batch=256.0, tokens=512, loss=0.5, history=None, budgets=None,
         status="complete", schedule="constant"):
    d = root / name
    d.mkdir(parents=True)
    summary = {"status": status, "non_embedding_parameters": params, "tokens_seen": tokens, "lr": lr,
               "batch_size_tokens": batch, "final_val_loss": loss, "flops_per_token": 6.0 * params,
               "flops": 6.0 * params * tokens, "lr_schedule": {"kind": schedule}, "val_history": history or []}
    if status == "diverged":
        summary["diverged"] = {"step": 7, "loss_name": "train/loss", "value": "nan"}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.yaml").write_text("trainer: {}\n")
    if budgets is not None:
        (d / "scaling.json").write_text(json.dumps({"budgets": budgets, "lr": lr, "batch_size": batch}))
    return d


def test_a_run_tree_gives_one_row_per_budget_and_names_what_it_leaves_out(tmp_path):
    history = [{"step": 1, "tokens": 256, "loss": 0.9}, {"step": 2, "tokens": 512, "loss": 0.7},
               {"step": 3, "tokens": 768, "loss": 0.6}]
    _run(tmp_path, "a/lr1", history=history, budgets=[256, 768], tokens=768, loss=0.6)
    _run(tmp_path, "a/lr2", lr=2e-3, history=history[:1], budgets=[256, 768], tokens=256, loss=0.9)  # stopped early
    _run(tmp_path, "b/plain", params=2000, lr=2e-3, batch=512.0, tokens=1024, loss=0.4)
    _run(tmp_path, "b/nan", status="diverged")
    (tmp_path / "b" / "unfinished").mkdir()
    (tmp_path / "b" / "unfinished" / "config.yaml").write_text("x: 1\n")
    (tmp_path / "a" / "lr1" / "eval" / "validate-0").mkdir(parents=True)  # a run's own evaluation records
    (tmp_path / "a" / "lr1" / "eval" / "validate-0" / "config.yaml").write_text("x: 1\n")
    t = load_runs(tmp_path)
    assert t.names == ["a/lr1@256", "a/lr1@768", "a/lr2@256", "b/plain"]
    assert t.tokens.tolist() == [256, 768, 256, 1024] and t.loss.tolist() == [0.9, 0.6, 0.9, 0.4]
    assert t.params.tolist() == [1000, 1000, 1000, 2000] and t.lr.tolist() == [1e-3, 1e-3, 2e-3, 2e-3]
    assert t.batch_size.tolist() == [256, 256, 256, 512]
    assert t.flops.tolist() == [6.0 * 1000 * 256, 6.0 * 1000 * 768, 6.0 * 1000 * 256, 6.0 * 2000 * 1024]
    reasons = {e["run"]: e["reason"] for e in t.excluded}
    assert set(reasons) == {"a/lr2@768", "b/nan", "b/unfinished"}
    assert "never validated at 768" in reasons["a/lr2@768"] and "diverged at step 7" in reasons["b/nan"]
    assert "incomplete" in reasons["b/unfinished"]
    assert t.units.lr_schedule == "constant" and t.units.params == "non_embedding" and t.has_hyperparameters


def test_csv_and_jsonl_tables(tmp_path):
    csv = tmp_path / "runs.csv"
    csv.write_text("name,params,tokens,lr,batch_size,loss\nr0,1e5,2e6,1e-3,512,0.9\nr1,2e5,2e6,1e-3,512,nan\n"
                   "r2,2e5,4e6,2e-3,1024,0.7\n")
    t = load_runs(csv)
    assert t.names == ["r0", "r2"] and t.params.tolist() == [1e5, 2e5] and t.loss.tolist() == [0.9, 0.7]
    assert t.excluded == [{"run": "r1", "reason": "loss is nan; kept out of the fits"}] and t.flops is None
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_text('{"params": 1e5, "tokens": 2e6, "loss": 0.9}\n\n{"params": 2e5, "tokens": 4e6, "loss": 0.8}\n')
    loss_only = load_runs(jsonl)
    assert not loss_only.has_hyperparameters and loss_only.names == ["row 0", "row 1"]
    np.testing.assert_array_equal(loss_only.tokens, [2e6, 4e6])


@pytest.mark.parametrize("text, error, message", [
    ("params,tokens,lr,batch_size\n1e5,1e6,1e-3,512\n", ValueError, r"missing column\(s\) \['loss'\]"),
    ("params,tokens,lr,loss\n1e5,1e6,1e-3,0.5\n", ValueError, "has 'lr' but not 'batch_size'"),
    ("params,tokens,loss,steps\n1e5,1e6,0.5,3\n", ValueError, r"unknown column\(s\) \['steps'\]"),
    ("params,tokens,loss\n1e5,many,0.5\n", ValueError, "column 'tokens' is 'many', not a number"),
    ("params,tokens,loss\n-1e5,1e6,0.5\n", ValueError, "column 'params' is -100000.0"),
    ("params,tokens,loss\n1e5,1e6,nan\n", ValueError, "no usable rows"),
    ("params,tokens,loss\n1.07,4e9,0.5\n0.5,4e9,0.6\n", UnitMismatchError, "params look like billions"),
    ("params,tokens,loss\n1.07e9,4,0.5\n5e8,10,0.6\n", UnitMismatchError, "tokens look like billions"),
    ("", ValueError, "empty file"),
])
def test_bad_tables_are_named(tmp_path, text, error, message):
    path = tmp_path / "runs.csv"
    path.write_text(text)
    with pytest.raises(error, match=message):
        load_runs(path)


def test_bad_trees_and_paths(tmp_path):
    with pytest.raises(ValueError, match="no runs found"):
        load_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="runs not found"):
        load_runs(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown table format '.txt'"):
        (tmp_path / "r.txt").write_text("x")
        load_runs(tmp_path / "r.txt")
    _run(tmp_path / "t", "only", status="diverged")
    with pytest.raises(ValueError, match="no usable run directories.*diverged"):
        load_runs(tmp_path / "t")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"params": 1e5, "tokens": 2e6, "loss": 0.9, "lr": 1e-3, "batch_size": 64}\n'
                     '{"params": 2e5, "tokens": 4e6, "loss": 0.8}\n')
    with pytest.raises(ValueError, match="has no lr/batch_size while others have them"):
        load_runs(mixed)


def test_one_size_and_mixed_schedules_warn(tmp_path):
    _run(tmp_path, "a", tokens=512)
    _run(tmp_path, "b", tokens=1024, schedule="cosine")
    t = load_runs(tmp_path)
    assert t.units.lr_schedule == "mixed"
    assert any("one model size" in w for w in t.warnings) and any("different learning-rate" in w for w in t.warnings)
