"""Divergence guard: a non-finite loss or gradient stops the run with a diagnosis and exit status 3,
keeps the last finite checkpoint, exports nothing non-finite, and summary.json stays strict JSON."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmgrow.rundir import CheckpointError, read_weights, strict_json
from mmgrow.training.cli import build_cli, cli_main
from mmgrow.training.divergence import DIVERGED_EXIT_CODE, DivergenceError, DivergenceGuard
from mmgrow.training.export import load_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.dim", "32", "--model.depth", "1", "--data.num_train", "32", "--data.num_val", "8",
        "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args", "{video: {grid: 4}}",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]


def strict(path: Path):
    """Parse as RFC 8259 JSON: a bare NaN / Infinity fails the test."""
    def reject(constant):
        raise AssertionError(f"{path.name} holds a bare {constant} (not valid JSON)")
    return json.loads(path.read_text(), parse_constant=reject)


def all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_diverging_run_exits_3_with_a_diagnosis_and_keeps_finite_files(tmp_path, capsys):
    rc = cli_main(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY,
                   "--trainer.default_root_dir", str(tmp_path), "--model.lr", "1e6"])
    err = capsys.readouterr().err
    assert rc == DIVERGED_EXIT_CODE == 3
    line = [x for x in err.splitlines() if "diverged" in x]
    assert len(line) == 1, err[-2000:]
    step = int(re.search(r"training diverged at step (\d+)", line[0])[1])
    assert "last finite training loss: " in line[0] and "lower the learning rate" in line[0]
    summary = strict(tmp_path / "summary.json")
    assert summary["status"] == "diverged" and summary["diverged"]["step"] == step
    assert math.isfinite(summary["diverged"]["last_finite_loss"])
    manifest = strict(tmp_path / "manifest.json")
    assert manifest["status"] == "diverged" and "model.safetensors" not in manifest["files"]
    # nothing non-finite anywhere: no exported weights, and last.ckpt holds the last finite state
    assert not (tmp_path / "model.safetensors").exists()
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert all_finite(read_weights(last))
    assert torch.load(last, weights_only=True)["global_step"] <= step
    assert summary["last_checkpoint"]["path"] == str(last)
    with pytest.raises(CheckpointError, match=f"diverged at step {step}.*last finite checkpoint is {re.escape(str(last))}"):
        load_model(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_guard_covers_the_codec_module_and_names_the_loss(tmp_path, capsys):
    rc = cli_main(["fit", "--config", str(ROOT / "recipes/codecs/latent_video.yaml"), "--model.codec.hidden", "4",
                   "--data.num_train", "16", "--data.num_val", "4", "--data.batch_size", "4",
                   "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                   "--trainer.max_steps", "4", "--trainer.default_root_dir", str(tmp_path),
                   "--model.lr", "1e12", "--model.warmup_steps", "0"])
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    assert re.search(r"training diverged at step \d+: train/loss = nan", err), err[-2000:]
    summary = strict(tmp_path / "summary.json")
    assert summary["status"] == "diverged" and summary["diverged"]["loss_name"] == "train/loss"
    assert summary["final_train_loss"] is None or math.isfinite(summary["final_train_loss"])
    assert not (tmp_path / "model.safetensors").exists()


def test_with_the_guard_off_export_refuses_non_finite_weights_and_the_summary_is_strict(tmp_path):
    off = '[{"class_path": "mmgrow.training.divergence.DivergenceGuard", "init_args": {"enabled": false}}]'
    with pytest.raises(CheckpointError, match="refusing to export non-finite weights"):
        build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, "--trainer.callbacks", off,
                   "--trainer.default_root_dir", str(tmp_path), "--model.lr", "1e6"])
    summary = strict(tmp_path / "summary.json")  # written before the export refused
    assert summary["final_train_loss"] is None and summary["metrics"]["train/loss"] is None
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "manifest.json").exists()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model(tmp_path)


# -------------------------------------------------------------------------------- the callback alone


def _trainer(step=7, **metrics):
    return SimpleNamespace(global_step=step, callback_metrics={k: torch.tensor(v) for k, v in metrics.items()})


def test_guard_names_a_non_finite_loss_with_the_last_finite_value():
    guard, module = DivergenceGuard(), nn.Linear(2, 2)
    guard.on_before_backward(_trainer(), module, torch.tensor(1.25))
    guard.on_before_optimizer_step(_trainer(), module, None)  # finite loss, no gradients: nothing to say
    guard.on_before_backward(_trainer(), module, torch.tensor(float("nan")))
    with pytest.raises(DivergenceError) as info:
        guard.on_before_optimizer_step(_trainer(**{"train/loss_video": float("inf"), "train/acc": 0.5}), module, None)
    d = info.value.divergence
    assert (d.step, d.loss_name, d.last_finite_loss, d.non_finite_parts) == (7, "train/loss", 1.25, ("train/loss_video",))
    assert "step 7" in str(info.value) and "1.25" in str(info.value)


def test_guard_names_the_parameter_with_a_non_finite_gradient_before_clipping():
    guard, module = DivergenceGuard(), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    module[1].bias.grad[0] = float("inf")
    guard.on_before_backward(_trainer(), module, torch.tensor(0.5))
    with pytest.raises(DivergenceError, match=r"gradient of 1\.bias is non-finite"):
        guard.on_before_optimizer_step(_trainer(), module, None)
    assert DivergenceGuard(check_gradients=False).on_before_optimizer_step(_trainer(), module, None) is None
    off = DivergenceGuard(enabled=False)
    off.on_before_backward(_trainer(), module, torch.tensor(float("nan")))
    assert off.on_before_optimizer_step(_trainer(), module, None) is None


def test_strict_json_writes_null_for_nan_and_infinities():
    text = strict_json({"a": float("nan"), "b": [1.0, float("-inf")], "c": {"d": float("inf"), "e": 2}}).decode()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [1.0, None],
                                                                       "c": {"d": None, "e": 2}}
