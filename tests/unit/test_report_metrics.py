"""The evaluation columns of one run: summary metrics, held-out probe scores, tasks and the latest eval/ records."""

from __future__ import annotations

import json

from report_fixtures import summary, write_run

from mmgrow.report.collect import collect_runs
from mmgrow.report.metrics import run_values


def test_every_recorded_scalar_becomes_one_dotted_column(tmp_path):
    s = summary(1.25, 1.0, 10, 64, bits=1.8)
    s["metrics"].update({"test/loss": 1.5, "train/extra": 3.0, "val/tokens_text": 0.0, "val/tokens_video": 768.0})
    s["tasks"] = {"heldout": {"clevr": {"task": "video_qa", "samples": 16, "accuracy": 0.625}}}
    run = write_run(tmp_path / "r", summary=s, heldout={
        "samples": [], "match_rate": {"shape": 0.5},
        "probe": {"text_alignment": {"all": 0.25, "colour": 0.75},
                  "scene_consistency": {"within_scene": 1.0, "transitions": None, "score": 0.5},
                  "frechet_distance": 12.5, "frechet_clips": 72, "frechet_features": 64}})
    for n, value in ((0, 9.0), (3, 4.0), (1, 7.0)):  # the latest needle-N (3) is the one reported
        (run / "eval" / f"needle-{n}").mkdir(parents=True)
        (run / "eval" / f"needle-{n}" / "needle.json").write_text(
            json.dumps({"accuracy": value, "by_length": {"64": value / 8}, "lengths": [64], "ok": True}))
    (values,) = [run_values(r) for r in collect_runs([run])]
    assert values == {
        "non_embedding_parameters": 1000.0, "parameters": 1100.0, "tokens_seen": 40.0, "final_train_loss": 1.0,
        "final_val_loss": 1.25, "val/bits_per_token": 1.8, "tokens_per_s": 10.0, "peak_memory_mib": 64.0,
        "state_size_per_example": 64.0, "flops_per_token": 6000.0,
        # val/loss is final_val_loss; train/ keys are not evaluation metrics; token and clip counts are bookkeeping
        "test/loss": 1.5,
        "heldout.match_rate.shape": 0.5, "heldout.probe.text_alignment.all": 0.25,
        "heldout.probe.text_alignment.colour": 0.75, "heldout.probe.scene_consistency.within_scene": 1.0,
        "heldout.probe.scene_consistency.score": 0.5, "heldout.probe.frechet_distance": 12.5,
        "tasks.heldout.clevr.accuracy": 0.625,
        "eval.needle.needle.accuracy": 4.0, "eval.needle.needle.by_length.64": 0.5}
