"""Every shipped recipe parses, instantiates, and trains two steps on CPU (codec recipes: and the
exported codec loads back from its run directory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmgrow.training.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.relative_to(ROOT) for p in (ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert Path("recipes/quickstart.yaml") in RECIPES


def _producer(init_from: str) -> Path:
    """The recipe whose run directory a later stage starts from (``model.init_from``)."""
    for recipe in RECIPES:
        trainer = yaml.safe_load((ROOT / recipe).read_text()).get("trainer") or {}
        if Path(trainer.get("default_root_dir", "")) == Path(init_from):
            return recipe
    raise AssertionError(f"no recipe writes {init_from}, which another recipe starts from")


def _processes(recipe: Path) -> int:
    devices = (yaml.safe_load((ROOT / recipe).read_text()).get("trainer") or {}).get("devices", 1)
    return devices if isinstance(devices, int) else 1


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_recipe_trains_two_steps(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["fit", "--config", str(recipe), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--data.num_train", "32", "--data.num_val", "8",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    init_from = (yaml.safe_load((ROOT / recipe).read_text()).get("model") or {}).get("init_from")
    if init_from:  # a later stage: first train the stage it starts from, two steps
        earlier = tmp_path / "earlier_stage"
        build_cli([*args[:2], str(_producer(init_from)), *args[3:-1], str(earlier)])
        args += ["--model.init_from", str(earlier)]
    if _processes(recipe) > 1:
        # Lightning launches the other ranks by re-running this process's command line: run the CLI
        # itself (not pytest) in a clean environment, as a user would.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK", "NODE_RANK"))}
        done = subprocess.run([sys.executable, "-m", "mmgrow", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    else:
        build_cli(args)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert summary["final_val_loss"] is not None and summary["final_val_loss"] > 0
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "model.safetensors").exists()
    assert "Unable to serialize" not in (tmp_path / "config.yaml").read_text()  # jsonargparse's placeholder
    stored = yaml.safe_load((tmp_path / "model.yaml").read_text())
    if "codec" in stored:  # a codec recipe: its export is what data pipelines load as `checkpoint`
        _check_codec_loads_back(stored["codec"], tmp_path)


def test_saved_config_of_a_list_of_mixers_replays(tmp_path, monkeypatch):
    """A hybrid recipe's ``config.yaml`` keeps each mixer as class_path + init_args and trains again from itself."""
    monkeypatch.chdir(ROOT)
    tiny = ["--model.dim", "32", "--data.num_train", "16", "--data.num_val", "8", "--data.batch_size", "8",
            "--data.dataset_args", "{frames: 2, size: 24, grid: 6}", "--trainer.limit_val_batches", "1",
            "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[{class_path: mmgrow.training.samples.GenerateSamples, init_args: {num_samples: 0}}]"]
    first, replay = tmp_path / "first", tmp_path / "replay"
    build_cli(["fit", "--config", "recipes/baselines/hybrid_cpu.yaml", *tiny, "--trainer.default_root_dir", str(first)])
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert [m["class_path"].rsplit(".", 1)[1] for m in saved["model"]["mixer"]] == \
        ["GatedDeltaNet", "Mamba2", "SlidingWindowAttention"]
    cli = build_cli(["fit", "--config", str(first / "config.yaml"), "--trainer.default_root_dir", str(replay)])
    assert cli.trainer.global_step == 1
    assert yaml.safe_load((replay / "config.yaml").read_text())["model"] == saved["model"]


def _check_codec_loads_back(spec: dict, run_dir: Path) -> None:
    """The codec named by ``model.yaml`` rebuilds from its init_args and loads the run's weights, frozen."""
    import importlib

    module, _, name = spec["class_path"].rpartition(".")
    codec = getattr(importlib.import_module(module), name)(**spec["init_args"], checkpoint=str(run_dir))
    assert codec.frozen and not any(p.requires_grad for p in codec.parameters())
