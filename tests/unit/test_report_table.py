"""``mmgrow report`` on fixture run directories with known numbers: the variant table, report.json, statuses."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from report_fixtures import ablation_tree

from mmgrow.report.aggregate import Stat, format_number, format_stat, mean_spread
from mmgrow.report.write import write_report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = ablation_tree(tmp_path_factory.mktemp("abl"))
    return root, write_report([root])


def _row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{md}")


def _header(md: str, first_cell: str) -> list[str]:
    return [c.strip() for c in next(line for line in md.splitlines()
                                    if line.startswith(f"| {first_cell} |")).strip().strip("|").split("|")]


def test_variant_rows_hold_hand_computed_mean_and_sample_std(report):
    root, _ = report
    md = (root / "report.md").read_text()
    head = _header(md, "variant")
    ttt = dict(zip(head, _row(md, "ttt")))
    # val 1.0, 1.2: mean 1.1, s = sqrt(2 * 0.1^2 / 1) = 0.1414 -> 0.14
    assert ttt["val loss"] == "1.1 ± 0.14"
    assert ttt["train loss"] == "1 ± 0.14"  # 0.9, 1.1
    assert ttt["tokens/s"] == "200 ± 140"  # 100, 300: s = 141.42
    assert ttt["peak mem (MiB)"] == "150 ± 71"  # 100, 200 MiB: s = 70.71
    assert ttt["val bits/token"] == "1.6 ± 0.14"
    assert ttt["heldout.probe.text_alignment.all"] == "0.75 ± 0.35"  # 0.5, 1.0: s = 0.3536
    assert ttt["heldout.probe.scene_consistency.score"] == "0.5 ± 0"
    assert ttt["non-emb. params"] == "1,000 ± 0" and ttt["params"] == "1,100 ± 0"
    assert ttt["n"] == "2" and ttt["not averaged"] == ""
    mamba = dict(zip(head, _row(md, "mamba")))
    assert mamba["n"] == "2" and mamba["not averaged"] == "1 diverged"  # the diverged 9.0 is not averaged in
    assert mamba["val loss"] == "2 ± 0"
    assert mamba["train loss"] == "1.7 ± 0.28"  # 1.9, 1.5: s = 0.2828
    assert mamba["val bits/token"] == "—"  # no mamba run recorded it
    assert "sample standard deviation" in md
    assert "Peak memory: CPU: peak resident set size of the training process." in md  # all fixture runs are CPU


def test_run_table_lists_every_run_with_status(report):
    root, _ = report
    md = (root / "report.md").read_text()
    head = _header(md, "run")
    diverged = dict(zip(head, _row(md, "mamba-s2")))
    assert diverged["status"] == "diverged" and diverged["val loss"] == "9" and diverged["seed"] == "2"
    assert dict(zip(head, _row(md, "ttt-s1")))["tokens/s"] == "300"


def test_report_json_holds_the_same_numbers(report):
    root, _ = report
    data = json.loads((root / "report.json").read_text())
    val = data["groups"]["ttt"]["stats"]["final_val_loss"]
    assert val["n"] == 2 and val["mean"] == pytest.approx(1.1, abs=1e-12)
    assert val["std"] == pytest.approx(math.sqrt(0.02), abs=1e-12)
    assert data["groups"]["mamba"]["seeds"] == [0, 1]
    assert {r["name"]: r["status"] for r in data["runs"]} == {
        "mamba-s0": "complete", "mamba-s1": "complete", "mamba-s2": "diverged", "ttt-s0": "complete",
        "ttt-s1": "complete"}
    assert data["columns"][:3] == ["non_embedding_parameters", "parameters", "tokens_seen"]
    assert "heldout.match_rate.colour" in data["columns"] and "val/loss" not in data["columns"]


def test_mean_spread_matches_statistics_module():
    xs = [0.1, 0.7, 0.35, 2.5]
    s = mean_spread(xs)
    assert s.mean == pytest.approx(statistics.fmean(xs), rel=1e-15)
    assert s.std == pytest.approx(statistics.stdev(xs), rel=1e-14)
    one = mean_spread([3.25, float("nan")])
    assert (one.mean, one.std, one.n, one.dropped) == (3.25, None, 1, 1)
    assert format_stat(one) == "3.25" and format_stat(mean_spread([])) == "—"
    assert format_stat(Stat(0.123456, 0.0012345, 2)) == "0.1235 ± 0.0012"
    assert format_number(524288.0) == "524,288"
