"""Exact resume: a run interrupted and resumed from its checkpoint trains on the batches and reaches the
losses of the uninterrupted run (CPU, float32, bit for bit), mid-epoch and at an epoch boundary; the
metrics of earlier runs in the same directory are kept.

Epochs are tiny (16 samples, batch 4: 4 batches per epoch). The warm-up (30 steps) is longer than the
runs, so the learning rate does not depend on ``max_steps`` and "stop at k, resume to N" must equal
"N straight".
"""

import csv
import hashlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from mmgrow.data.resumable_data import capture_rng, restore_rng
from mmgrow.data.resumable_sampler import ResumableSampler
from mmgrow.training.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10  # 2.5 epochs
TINY = ["--model.dim", "32", "--model.depth", "1", "--data.num_train", "16", "--data.batch_size", "4",
        "--data.num_val", "4", "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args",
        "{video: {grid: 4}}", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=mmgrow.training.samples.GenerateSamples", "--trainer.callbacks.num_samples", "0"]
# An objective that draws random numbers every step (flow-matching times; the adaLN timestep makes the loss
# depend on them; captioning keeps the discrete targets causal), so the loss matches only if the RNG stream is restored too.
FLOW = ["--model.objective", "{class_path: mmgrow.objectives.flow_matching.FlowMatchingObjective}",
        "--model.modulation", "{kind: adaln_zero, cond_dim: 16}", "--data.tasks", "[video_to_text]",
        "--trainer.callbacks+=mmgrow.training.samples.GenerateCaptions", "--trainer.callbacks.num_samples", "0"]


class Record(pl.Callback):
    """Per training step: (global step, hash of the batch's input ids, loss)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        digest = hashlib.sha1(batch.input_ids.numpy().tobytes()).hexdigest()
        self.steps.append((trainer.global_step, digest, outputs["loss"].item()))


class Crash(pl.Callback):
    """Raises after the training step ``at`` (after the checkpoint callbacks listed before it saved)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt  # Lightning's graceful interrupt: like a killed job


def fit(run: Path, steps: int, *extra: str, ckpt: Path | None = None, callbacks=()) -> list[tuple[int, str, float]]:
    cli = build_cli(["--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, *extra, "--trainer.max_steps",
                     str(steps), "--trainer.default_root_dir", str(run)], run=False)
    record = Record()
    cli.trainer.callbacks.extend([record, *callbacks])
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=None if ckpt is None else str(ckpt))
    return record.steps


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return {"ar": fit(tmp_path_factory.mktemp("straight_ar"), STEPS),
            "flow": fit(tmp_path_factory.mktemp("straight_flow"), STEPS, *FLOW)}


def assert_same_run(resumed, straight):
    assert [s for s, _, _ in resumed] == list(range(1, STEPS + 1))
    assert [h for _, h, _ in resumed] == [h for _, h, _ in straight], "a different batch sequence"
    assert [loss for _, _, loss in resumed] == [loss for _, _, loss in straight], "different losses"


@pytest.mark.parametrize("stop", [6, 8], ids=["mid_epoch", "epoch_boundary"])
def test_stop_and_resume_from_last_ckpt_equals_straight_run(tmp_path, straight, stop):
    """`max_steps` stops the run (last.ckpt written there); a second run resumes it to STEPS."""
    first = fit(tmp_path, stop)
    second = fit(tmp_path, STEPS, ckpt=tmp_path / "checkpoints" / "last.ckpt")
    assert_same_run(first + second, straight["ar"])


def test_crash_after_a_mid_epoch_checkpoint_resumes_exactly_with_random_objective(tmp_path, straight):
    """A checkpoint written after step 6 (mid-epoch, just before the validation after step 6, which the
    resumed run skips), then the job dies; the flow-matching objective draws noise every step."""
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=6, save_top_k=-1)
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into an exit (code 1) after cleaning up
        fit(tmp_path, STEPS, *FLOW, callbacks=[every, Crash(at=6)])
    first = [s for s in straight["flow"] if s[0] <= 6]  # the crashed run's own record ends with the crash
    second = fit(tmp_path, STEPS, *FLOW, ckpt=next((tmp_path / "steps").glob("*step=6*.ckpt")))
    assert_same_run(first + second, straight["flow"])


def test_resume_at_epoch_boundary_with_random_objective(tmp_path, straight):
    first = fit(tmp_path, 8, *FLOW)
    second = fit(tmp_path, STEPS, *FLOW, ckpt=tmp_path / "checkpoints" / "last.ckpt")
    assert_same_run(first + second, straight["flow"])


def test_resuming_keeps_earlier_metrics_rows(tmp_path):
    fit(tmp_path, 4)
    before = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    fit(tmp_path, 7, ckpt=tmp_path / "checkpoints" / "last.ckpt")
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    train = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train == list(range(7)), train  # appended: one continuous curve, no step twice
    assert [r["train/loss"] for r in rows[:len(before)]] == [r["train/loss"] for r in before]
    assert not list(tmp_path.glob("metrics.*.csv"))
    # a new run (from step 0) in the same directory keeps the old file aside instead of mixing curves
    fit(tmp_path, 2)
    assert list(csv.DictReader((tmp_path / "metrics.1.csv").open())) == rows
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r.get("train/loss")] == [0, 1]


def test_sampler_position_round_trip():
    sampler = ResumableSampler(10, seed=3)
    epoch0, epoch1 = sampler.permutation(0), sampler.permutation(1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert list(sampler) == epoch0
    sampler.advance(4)  # the loop consumed one batch of 4; iteration alone never moves the position
    resumed = ResumableSampler(10, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == list(sampler) == epoch0[4:]
    resumed.advance(4)
    resumed.advance(4)  # the last, short batch of the epoch rolls over
    assert resumed.state_dict()["epoch"] == 1 and list(resumed) == epoch1
    with pytest.raises(ValueError, match="seed=3, this run has seed=4"):
        ResumableSampler(10, seed=4).load_state_dict(sampler.state_dict())
    # two data-parallel replicas share the rest of the epoch without overlap
    shards = [ResumableSampler(10, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for s in shards:
        s.load_state_dict(sampler.state_dict())
    assert sorted(list(shards[0]) + list(shards[1])) == sorted(epoch0[4:]) and len(shards[0]) == 5


def test_rng_state_round_trip():
    import random

    state = capture_rng()
    drawn = (torch.rand(3), random.random())
    restore_rng(state)
    assert torch.equal(torch.rand(3), drawn[0]) and random.random() == drawn[1]
