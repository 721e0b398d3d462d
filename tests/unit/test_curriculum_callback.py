"""The model side of curriculum stages (mmgrow.training.curriculum.Curriculum): RoPE theta switches at the
declared steps, the optimizer's lr is the scheduler's lr times the stage's scale (scheduler untouched),
the stage is logged to metrics.csv, a crash and ``--ckpt_path`` resume mid-stage reproduce the straight
run's losses and thetas, and the exported model comes back with the final theta.

Tiny quickstart model (dim 32, depth 1, ``full`` attention with RoPE), batch 4, 8 steps; the stages
come from the recipe's ``data.curriculum``, as a user writes them.
"""

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from mmgrow.data.curriculum import CurriculumSchedule
from mmgrow.layers.rope import RotaryEmbedding
from mmgrow.training.cli import build_cli
from mmgrow.training.curriculum import Curriculum, rope_thetas
from mmgrow.training.export import load_model
from mmgrow.training.module import warmup_cosine

ROOT = Path(__file__).resolve().parents[2]
STEPS, WARMUP = 8, 3
STAGES = [{"until": {"step": 3}, "rope_theta": 1.0e4},
          {"until": {"step": 6}, "rope_theta": 1.0e5, "lr_scale": 0.5, "name": "middle"},
          {"rope_theta": 1.0e6, "lr_scale": 0.25}]
THETA = [1.0e4] * 3 + [1.0e5] * 3 + [1.0e6] * 2  # by global step
SCALE = [1.0] * 3 + [0.5] * 3 + [0.25] * 2
TINY = ["--model.dim", "32", "--model.depth", "1", "--model.warmup_steps", str(WARMUP), "--data.num_train", "32",
        "--data.batch_size", "4", "--data.num_val", "4", "--data.dataset_args", "{frames: 2, size: 32}",
        "--data.codec_args", "{video: {grid: 4}}", "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "100", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(STEPS),
        "--trainer.callbacks+=mmgrow.training.samples.GenerateSamples", "--trainer.callbacks.num_samples", "0"]


class Record(pl.Callback):
    """Per training step: (global step, RoPE thetas the batch ran with, loss, optimizer lr at the step,
    scheduler lr at the step, optimizer lr right after the step)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        # registered after the Curriculum callback's post-hook, so "after" sees the restored value
        trainer.optimizers[0].register_step_post_hook(lambda o, a, k: self.steps[-1].update(
            after=o.param_groups[0]["lr"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning runs this inside optimizer.step(closure), after the closure (forward/backward) and before
        # the update reads param_groups; this callback comes after Curriculum, so it sees the lr the update uses.
        self.steps[-1].update(lr=optimizer.param_groups[0]["lr"],
                              sched_lr=trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append({"step": trainer.global_step, "theta": rope_thetas(pl_module.model)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["loss"] = outputs["loss"].item()


class Crash(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def with_stages(stages) -> list[str]:
    return [] if stages is None else ["--data.curriculum", json.dumps(stages)]


def fit(run: Path, *, stages=STAGES, ckpt: Path | None = None, callbacks=()) -> list[dict]:
    cli = build_cli(["--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, *with_stages(stages),
                     "--trainer.default_root_dir", str(run)], run=False)
    assert any(isinstance(c, Curriculum) for c in cli.trainer.callbacks), "Curriculum is not an always-on callback"
    if stages is not None:
        assert isinstance(cli.datamodule.curriculum, CurriculumSchedule)
    record = Record()
    cli.trainer.callbacks.extend([record, *callbacks])
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=None if ckpt is None else str(ckpt))
    return record.steps


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("curriculum_straight")
    return run, fit(run)


def test_theta_switches_exactly_at_the_declared_steps(straight):
    _, steps = straight
    assert [s["step"] for s in steps] == list(range(STEPS))
    for s in steps:
        assert s["theta"] and set(s["theta"]) == {THETA[s["step"]]}, s


def test_lr_is_scheduler_lr_times_stage_scale_and_the_scheduler_is_untouched(straight):
    _, steps = straight
    factor = warmup_cosine(WARMUP, STEPS, 0.1)  # MMGrowModule's default min_lr_ratio
    for s in steps:
        base = 3.0e-3 * factor(s["step"])  # the recipe's lr through the project's default schedule
        assert math.isclose(s["sched_lr"], base, rel_tol=1e-12), (s, base)
        assert s["lr"] == s["sched_lr"] * SCALE[s["step"]], s
        assert s["after"] == s["sched_lr"], "the scaled lr leaked past the optimizer step"


def test_stage_is_logged_every_step(straight):
    run, _ = straight
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("curriculum/stage")]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    for r in rows:
        step = int(r["step"])
        assert float(r["curriculum/stage"]) == (0 if step < 3 else 1 if step < 6 else 2)
        assert float(r["curriculum/rope_theta"]) == THETA[step]
        assert float(r["curriculum/lr_scale"]) == SCALE[step]
        assert float(r["curriculum/batch_size"]) == 4


def test_exported_model_has_the_final_theta(straight):
    run, _ = straight
    model = load_model(run)
    thetas = [m.theta for m in model.modules() if isinstance(m, RotaryEmbedding)]
    assert thetas and set(thetas) == {1.0e6}
    growth = yaml.safe_load((run / "model.yaml").read_text())["growth"]
    assert growth[-1]["init_args"]["rope_theta"] == 1.0e6


def test_crash_mid_stage_then_ckpt_path_resume_equals_straight_run(tmp_path, straight):
    """Checkpoint after step 4 (inside stage 1), crash; the resumed model starts with the default theta
    (not in the state dict) unless the callback re-applies the stage from global_step."""
    _, want = straight
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(SystemExit):
        fit(tmp_path, callbacks=[every, Crash(at=4)])
    second = fit(tmp_path, ckpt=next((tmp_path / "steps").glob("*step=4*.ckpt")))
    got = [s for s in want if s["step"] < 4] + second
    assert [s["step"] for s in got] == list(range(STEPS))
    assert [s["theta"] for s in got] == [s["theta"] for s in want]
    assert [s["loss"] for s in got] == [s["loss"] for s in want], "different loss trajectory after resume"
    assert [s["lr"] for s in got] == [s["lr"] for s in want]
    assert set(rope_thetas(load_model(tmp_path))) == {1.0e6}


def test_without_a_curriculum_nothing_changes(tmp_path):
    steps = fit(tmp_path, stages=None)
    assert all(set(s["theta"]) == {1.0e4} and s["lr"] == s["sched_lr"] for s in steps)
    header = next(csv.reader((tmp_path / "metrics.csv").open()))
    assert not [h for h in header if h.startswith("curriculum/")]
    assert "growth" not in yaml.safe_load((tmp_path / "model.yaml").read_text())


@pytest.mark.parametrize("stages, message", [
    ([{"until": {"step": 3}, "rope_thta": 1.0e5}, {}], r"stage 0: unknown keys \['rope_thta'\]"),
    ([{"until": {"step": 5}}, {"until": {"step": 5}}, {}], "stage 1: ends at step 5, which is not after"),
    ([{"until": {"step": 5}, "rope_theta": -1.0}], "rope_theta must be a finite number > 0"),
])
def test_bad_stage_fails_at_construction(stages, message):
    with pytest.raises(ValueError, match=message):
        CurriculumSchedule(stages, batch_size=4)


def test_a_schedule_of_the_wrong_type_is_refused():
    class DM:
        def __init__(self) -> None:
            self.curriculum = [{"rope_theta": 1.0e5}]

    class T:
        datamodule = DM()

    with pytest.raises(TypeError, match="must be a CurriculumSchedule, got list"):
        Curriculum.schedule(T())


def test_validating_a_mid_curriculum_checkpoint_uses_its_stage_theta(tmp_path, straight):
    """`validate --ckpt_path` of the step-4 checkpoint (stage 1) runs with theta 1e5, not the model's 1e4."""
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(SystemExit):
        fit(tmp_path / "run", callbacks=[every, Crash(at=4)])
    cli = build_cli(["--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, *with_stages(STAGES),
                     "--trainer.default_root_dir", str(tmp_path / "val")], run=False)
    seen = []

    class Theta(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            seen.append(set(rope_thetas(pl_module.model)))

    cli.trainer.callbacks.append(Theta())
    cli.trainer.validate(cli.model, cli.datamodule, ckpt_path=str(next((tmp_path / "steps").glob("*step=4*.ckpt"))))
    assert seen == [{1.0e5}]  # Lightning's validate leaves trainer.global_step at 0: the checkpoint's step counts
