"""``mmgrow report`` inputs: grouping without ablation_run.json, partial and unreadable runs, bad paths, --metrics,
and the automatic Elo section (a fake ``pairwise_elo``)."""

from __future__ import annotations

import json
import sys
import types

from report_fixtures import ablation_tree, summary, write_run

from mmgrow.__main__ import main
from mmgrow.report.collect import collect_runs
from mmgrow.report.write import write_report


def test_runs_without_ablation_record_group_by_relative_path_and_seed_from_config(tmp_path):
    write_run(tmp_path / "sweep" / "d64" / "lr1", summary=summary(1.0, 1.0, 10, 10), config="seed_everything: 7\n")
    write_run(tmp_path / "sweep" / "d64" / "lr2", summary=summary(2.0, 2.0, 10, 10), config="trainer: {}\n")
    write_run(tmp_path / "other" / "run", summary=summary(3.0, 3.0, 10, 10))
    # an eval/ record inside a run is not a run of its own
    write_run(tmp_path / "other" / "run" / "eval" / "validate-1", summary=summary(9.0, 9.0, 1, 1))
    runs = collect_runs([tmp_path / "sweep", tmp_path / "other"])
    assert [(r.group, r.seed, r.status) for r in runs] == [
        ("sweep/d64/lr1", 7, "complete"), ("sweep/d64/lr2", None, "complete"), ("other/run", 0, "complete")]


def test_partial_and_unreadable_runs_are_listed_not_averaged(tmp_path):
    write_run(tmp_path / "good", summary=summary(1.5, 1.0, 10, 10))
    write_run(tmp_path / "broken", summary_text="{not json")
    write_run(tmp_path / "running", csv_rows=[{"epoch": 0, "step": 1, "train/loss": 4.0}])
    rep = write_report([tmp_path])
    status = {r["name"]: r["status"] for r in rep["runs"]}
    assert status["good"] == "complete" and status["running"] == "partial"
    assert status["broken"].startswith("unreadable: Expecting property name")
    assert rep["groups"]["broken"]["n"] == 0 and rep["groups"]["broken"]["not_averaged"] == "1 unreadable"
    md = (tmp_path / "report.md").read_text()
    assert "| broken | 0 | 1 unreadable | — |" in md and "unreadable: Expecting property name" in md


def test_missing_or_empty_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "mmgrow: error: report:" in capsys.readouterr().err and not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no runs found below" in capsys.readouterr().err


def test_metrics_option_restricts_columns_and_rejects_unknown(tmp_path, capsys):
    root = ablation_tree(tmp_path / "abl")
    assert main(["report", str(root), "--out", str(tmp_path / "o"), "--metrics", "final_val_loss",
                 "heldout.probe.*"]) == 0
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["columns"] == ["final_val_loss", "heldout.probe.scene_consistency.score",
                               "heldout.probe.text_alignment.all"]
    assert set(data["groups"]["ttt"]["stats"]) == set(data["columns"])
    assert "report: 5 run(s) (4 complete, 1 diverged) in 2 variant(s)" in capsys.readouterr().out
    assert main(["report", str(root), "--metrics", "fid"]) == 2
    assert "--metrics 'fid' matches no column" in capsys.readouterr().err


def test_elo_section_from_pairwise_elo(tmp_path, monkeypatch):
    root = ablation_tree(tmp_path / "abl")
    seen = {}

    def fake_pairwise_elo(groups, *, samples=1000, seed=0):
        seen.update(groups)
        return {"method": "bradley_terry", "judge": "attribute probe (automatic stand-in for human Elo)",
                "games": 12, "prompts": 3, "ratings": {"mamba": {"elo": 983.4, "low": 950.0, "high": 1010.2},
                                                       "ttt": {"elo": 1016.6, "low": 990.1, "high": 1049.9}},
                "wins": {"ttt": {"mamba": [7, 1, 4]}, "mamba": {"ttt": [4, 1, 7]}}}

    monkeypatch.setitem(sys.modules, "mmgrow.evaluation.elo", types.SimpleNamespace(pairwise_elo=fake_pairwise_elo))
    rep = write_report([root])
    # only complete runs are judged: the diverged mamba-s2 is left out
    assert {g: sorted(p.name for p in paths) for g, paths in seen.items()} == {
        "mamba": ["mamba-s0", "mamba-s1"], "ttt": ["ttt-s0", "ttt-s1"]}
    md = (root / "report.md").read_text()
    section = md.split("## Automatic Elo")[1].split("## Runs")[0]
    assert "Automatic stand-in for the seed paper's human Elo" in section and "attribute probe" in section
    assert "12 games on 3 prompts" in section
    assert section.index("| ttt | 1017 | [990, 1050] | 7 / 1 / 4 |") < section.index("| mamba | 983 | [950, 1010] |")
    assert json.loads((root / "report.json").read_text())["elo"]["games"] == 12 and rep["elo_note"] == ""


def test_elo_absent_says_why(tmp_path, monkeypatch):
    root = ablation_tree(tmp_path / "abl")
    monkeypatch.setitem(sys.modules, "mmgrow.evaluation.elo",
                        types.SimpleNamespace(pairwise_elo=lambda groups, **kw: None))
    rep = write_report([root])
    assert rep["elo"] is None and "fewer than two variants have probe readings" in rep["elo_note"]
    assert "Automatic Elo not computed" in (root / "report.md").read_text()


def test_elo_module_missing_is_a_note_not_a_failure(tmp_path, monkeypatch):
    root = ablation_tree(tmp_path / "abl")
    monkeypatch.setitem(sys.modules, "mmgrow.evaluation.elo", None)  # None in sys.modules: import raises
    rep = write_report([root], metrics=["final_val_loss"])
    assert rep["elo"] is None and rep["elo_note"].startswith("not computed: mmgrow.evaluation.elo is not available")
    assert (root / "report.json").is_file()


def test_unreadable_ablation_record_groups_by_path_and_elo_error_is_a_note(tmp_path, monkeypatch):
    write_run(tmp_path / "a", summary=summary(1.0, 1.0, 10, 10)).joinpath("ablation_run.json").write_text("{oops")
    write_run(tmp_path / "b", summary=summary(2.0, 2.0, 10, 10), ablation={"variant": "v", "seed": 3})

    def broken(groups, **kw):
        raise ValueError("samples/heldout.json is not valid JSON")

    monkeypatch.setitem(sys.modules, "mmgrow.evaluation.elo", types.SimpleNamespace(pairwise_elo=broken))
    rep = write_report([tmp_path])
    assert {g: row["seeds"] for g, row in rep["groups"].items()} == {"a": [0], "v": [3]}
    assert rep["elo_note"] == "not computed: samples/heldout.json is not valid JSON"
