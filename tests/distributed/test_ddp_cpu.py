"""The one loop under Lightning DDP on CPU (gloo, 2 processes): artifacts, global token counts and
validation metrics averaged over ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_two_process_ddp_fit_writes_one_run_directory(tmp_path):
    run = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))}
    cmd = [sys.executable, "-m", "mmgrow", "fit", "--config", "recipes/quickstart.yaml",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "3",
           "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--data.num_train", "256",
           "--data.batch_size", "8", "--model.dim", "32", "--model.depth", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_step"] == 3
    # every quickstart example is 1 + 4*37 video tokens plus a caption of 18..28 bytes + bos/eos;
    # counting one rank only would fall below the lower bound
    per_example = (1 + 4 * 37 + 18 + 2, 1 + 4 * 37 + 28 + 2)
    examples = 2 * 8 * 3  # both ranks' batches, three steps
    assert examples * per_example[0] <= s["tokens_seen"] <= examples * per_example[1], s["tokens_seen"]
    for name in ("model.safetensors", "model.yaml", "checkpoints/last.ckpt", "plots/loss.png", "samples/heldout.json"):
        assert (run / name).is_file(), name


def test_unival_recipe_under_ddp_with_a_modality_absent_from_every_batch(tmp_path):
    """The multitask recipe declares audio (for its fine-tune) but no audio source: its input weights get
    no signal, and DDP without find_unused_parameters must still reduce a (zero) gradient for them."""
    run = tmp_path / "unival_ddp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))}
    cmd = [sys.executable, "-m", "mmgrow", "fit", "--config", "recipes/unival/multitask_cpu.yaml",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--data.num_train", "64",
           "--data.num_val", "2", "--data.batch_size", "4", "--model.dim", "32", "--model.depth", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_step"] == 2 and set(s["tasks"]) == {"val", "heldout"}
