"""Exact resume of a mixture with extras and a curriculum through `fit`: a run stopped in the middle of a
curriculum stage and resumed from last.ckpt trains on the batches and reaches the losses of the
uninterrupted run (CPU, float32, bit for bit), with gradient accumulation (stage of batch k = step
k // 2)."""

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

from mmgrow.training.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
STEPS = 7
SOURCES = [{"name": "t2v", "task": "text_to_video", "weight": 1},
           {"name": "cap", "task": "video_to_text", "weight": 1},
           {"name": "extra", "task": "video_to_text", "every": 3}]
CURRICULUM = [{"until": {"step": 2}, "batch_size": 2, "mixture": {"cap": 0}},
              {"until": {"step": 5}, "batch_size": 3, "mixture": {"cap": 2}},
              {"batch_size": 4}]
LENGTHS = [160, 256, 320]  # packing length per stage (the packed variant)
ARGS = ["--model.dim", "32", "--model.depth", "1", "--data.num_train", "16", "--data.batch_size", "4",
        "--data.num_val", "4", "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args",
        "{video: {grid: 4}}", "--data.sources", json.dumps(SOURCES),
        "--trainer.accumulate_grad_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=mmgrow.training.samples.GenerateSamples",
        "--trainer.callbacks.num_samples", "0"]


class Record(pl.Callback):
    """Per micro-batch: (global step, rows, hash of the input ids, loss)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        digest = hashlib.sha1(batch.input_ids.numpy().tobytes()).hexdigest()
        self.batches.append((trainer.global_step, batch.input_ids.shape[0], digest, outputs["loss"].item()))


def fit(run: Path, steps: int, *extra: str, ckpt: Path | None = None) -> list[tuple[int, int, str, float]]:
    cli = build_cli(["--config", str(ROOT / "recipes/quickstart.yaml"), *ARGS, *extra, "--trainer.max_steps",
                     str(steps), "--trainer.default_root_dir", str(run)], run=False)
    record = Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=None if ckpt is None else str(ckpt))
    return record.batches


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_stop_mid_stage_and_resume_equals_the_straight_run(tmp_path, packed):
    curriculum = [{**stage, "length": n} for stage, n in zip(CURRICULUM, LENGTHS)] if packed else CURRICULUM
    extra = ["--data.curriculum", json.dumps(curriculum), *(["--data.packing", "{length: 160}"] if packed else [])]
    straight = fit(tmp_path / "straight", STEPS, *extra)
    if not packed:  # micro-batch k has batch_size of stage_at(k // 2): 2 for steps 0-1, 3 for steps 2-4, 4 after
        assert [rows for _, rows, _, _ in straight] == [2] * 4 + [3] * 6 + [4] * 4
    else:  # every example (< 80 tokens) fits with the others of its batch into one row of the stage's length
        assert [rows for _, rows, _, _ in straight] == [1] * 14
    first = fit(tmp_path / "run", 3, *extra)  # stops after step 3: in the middle of stage 1 (steps 2-4)
    second = fit(tmp_path / "run", STEPS, *extra, ckpt=tmp_path / "run" / "checkpoints" / "last.ckpt")
    resumed = first + second
    assert [h for _, _, h, _ in resumed] == [h for _, _, h, _ in straight], "a different batch sequence"
    assert [loss for *_, loss in resumed] == [loss for *_, loss in straight], "different losses"
