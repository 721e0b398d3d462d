"""``mmgrow report`` on directories written by real ``mmgrow fit`` runs (two seeds and a diverged run)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from mmgrow.report.write import write_report

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.dim", "32", "--model.depth", "1", "--data.num_train", "32", "--data.num_val", "8",
        "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args", "{video: {grid: 4}}",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1"]


@pytest.mark.slow
def test_report_of_real_fits_matches_their_summaries(tmp_path):
    from mmgrow.training.cli import cli_main

    runs = {("q", 0): [], ("q", 1): [], ("hot", 0): ["--model.lr", "1e6"]}
    for (variant, seed), extra in runs.items():
        run = tmp_path / "runs" / variant / f"s{seed}"
        run.mkdir(parents=True)
        # what `mmgrow ablate` writes before a run trains
        (run / "ablation_run.json").write_text(json.dumps({"variant": variant, "seed": seed, "overrides": {},
                                                           "ablation": str(tmp_path)}))
        cli_main(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, *extra,
                  "--seed_everything", str(seed), "--trainer.default_root_dir", str(run)])
    rep = write_report([tmp_path])
    summaries = [json.loads((tmp_path / "runs" / "q" / f"s{s}" / "summary.json").read_text()) for s in (0, 1)]
    stats = rep["groups"]["q"]["stats"]
    val = [s["final_val_loss"] for s in summaries]
    assert stats["final_val_loss"].mean == pytest.approx(statistics.fmean(val), rel=1e-12)
    assert stats["final_val_loss"].std == pytest.approx(statistics.stdev(val), rel=1e-12)
    assert val[0] != val[1]  # the seeds differ, so the spread is a real one
    assert stats["peak_memory_mib"].mean == pytest.approx(
        statistics.fmean(s["peak_memory_bytes"] for s in summaries) / 2 ** 20)
    assert rep["groups"]["q"]["seeds"] == [0, 1] and rep["groups"]["q"]["n"] == 2
    assert rep["groups"]["hot"]["n"] == 0 and rep["groups"]["hot"]["not_averaged"] == "1 diverged"
    curves = {c.metric: c for c in rep["plot_data"]["loss_vs_tokens.png"]["curves"] if c.group == "q"}
    assert curves["train/loss"].runs == 2 and curves["val/loss"].runs == 2
    # the last val point is the mean of the two final val losses, at the run's total tokens
    assert curves["val/loss"].mean[-1] == pytest.approx(statistics.fmean(val), rel=1e-6)
    # no perf/tokens_seen column here: x = (step + 1) * tokens_seen / global_step, the run's total at the end
    assert curves["val/loss"].x[-1] == pytest.approx(statistics.fmean(s["tokens_seen"] for s in summaries))
    assert curves["val/loss"].x[0] == pytest.approx(statistics.fmean(s["val_history"][0]["tokens"] for s in summaries))
    md = (tmp_path / "report.md").read_text()
    assert "| hot | 0 | 1 diverged |" in md and "| hot/s0 | hot | 0 | diverged | cpu |" in md
