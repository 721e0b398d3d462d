"""Every shipped recipe parses, instantiates, and trains two steps on CPU."""

import json
from pathlib import Path

import pytest

from mmgrow.training.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.relative_to(ROOT) for p in (ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert Path("recipes/quickstart.yaml") in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_recipe_trains_two_steps(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    build_cli(["fit", "--config", str(recipe), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
               "--trainer.limit_val_batches", "1", "--data.num_train", "32", "--data.num_val", "8",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert summary["final_val_loss"] is not None and summary["final_val_loss"] > 0
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "model.safetensors").exists()
