"""Growth between training stages: ``init_from`` + ``growth`` + ``train_parameters`` in the training
module (through ``mmgrow fit``), replay in ``load_model``, and ``mmgrow grow`` offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from mmgrow.__main__ import main
from mmgrow.growth.check import output_change
from mmgrow.rundir import CheckpointError, read_weights
from mmgrow.training.cli import build_cli
from mmgrow.training.export import load_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.dim", "32", "--model.depth", "1", "--data.num_train", "32", "--data.num_val", "8",
        "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args", "{video: {grid: 4}}",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "2"]


def _fit(root: Path, *extra: str, config: Path | None = None):
    return build_cli(["fit", "--config", str(config or ROOT / "recipes/quickstart.yaml"), *TINY,
                      "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root), *extra])


def _stage2_recipe(tmp: Path, init_from: Path, growth: list, train: str = "all") -> Path:
    recipe = yaml.safe_load((ROOT / "recipes/quickstart.yaml").read_text())
    recipe["model"].update({"init_from": str(init_from), "growth": growth, "train_parameters": train})
    path = tmp / "stage2.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _metrics(run: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(run / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if v not in ("", None):
                    out.setdefault(k, []).append(float(v))
    return out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    _fit(d)
    return d


def test_fit_grows_from_a_checkpoint_trains_only_new_and_exports_the_history(stage1, tmp_path):
    growth = [{"class_path": "insert_depth", "init_args": {"count": 1}}]
    cli = _fit(tmp_path / "run", config=_stage2_recipe(tmp_path, stage1, growth, "new"))
    run = tmp_path / "run"
    model = cli.model.model
    assert model.backbone.depth == 2
    m = _metrics(run)
    assert m["growth/loss_jump"] == [0.0] and m["growth/loss_before"] == m["growth/loss_after"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["growth"]["loss_jump"]["growth/loss_jump"] == 0.0
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.blocks[1].parameters())
    # Frozen: the original block, embeddings and heads are bit-identical to stage 1's weights.
    old = read_weights(stage1)
    new = dict(model.state_dict())
    for key, value in old.items():
        assert torch.equal(new[key], value), key
    assert new["backbone.blocks.1.mlp.w_down.weight"].abs().sum() > 0  # the new block's zeroed output trained
    cfg = yaml.safe_load((run / "model.yaml").read_text())
    assert cfg["depth"] == 1 and [g["class_path"] for g in cfg["growth"]] == ["mmgrow.growth.depth.InsertDepthGrowth"]
    rebuilt = load_model(run)
    assert output_change(model.cpu().eval(), rebuilt.eval())["max_abs"] == 0.0


def test_a_checkpoint_that_does_not_match_the_config_is_a_clear_error(stage1, tmp_path):
    recipe = _stage2_recipe(tmp_path, stage1, [{"class_path": "stack"}])
    with pytest.raises(CheckpointError, match=r"depth: checkpoint 1 vs config 2"):
        _fit(tmp_path / "run", "--model.depth", "2", config=recipe)


def test_grow_cli_writes_a_model_that_loads_and_chains(stage1, tmp_path, capsys):
    out = tmp_path / "grown"
    assert main(["grow", "--from", str(stage1), "--growth", "insert_depth",
                 "--growth", "{class_path: add_text_condition, init_args: {cond_dim: 12, num_heads: 2}}",
                 "--out", str(out)]) == 0
    report = json.loads((out / "growth_report.json").read_text())
    assert report["output_change"]["max_abs"] == 0.0
    assert [r["preserves"] for r in report["reports"]] == ["exact", "exact"]
    assert "max |dy| = 0" in capsys.readouterr().out
    grown = load_model(out)
    assert grown.backbone.depth == 2 and len(grown.blocks[1].cross_attentions) == 1

    out2 = tmp_path / "stacked"
    assert main(["grow", "--from", str(out), "--growth", "{class_path: stack, init_args: {factor: 2}}",
                 "--out", str(out2)]) == 0
    stacked = load_model(out2)
    assert stacked.backbone.depth == 4
    assert len(yaml.safe_load((out2 / "model.yaml").read_text())["growth"]) == 3
    assert json.loads((out2 / "growth_report.json").read_text())["output_change"]["max_abs"] > 0


def test_grow_cli_errors_exit_2_and_write_nothing(stage1, tmp_path, capsys):
    assert main(["grow", "--from", str(stage1), "--growth", "insert_depth", "--out", str(stage1)]) == 2
    assert main(["grow", "--from", str(stage1), "--growth", "{init_args: {}}", "--out", str(tmp_path / "x")]) == 2
    assert main(["grow", "--from", str(tmp_path / "missing"), "--growth", "stack", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "is the source's directory" in err and "needs a class_path" in err and "not found" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_lightning_checkpoint_works_as_init_from(stage1, tmp_path):
    from mmgrow.rundir import has_model_config
    from mmgrow.training.growth_stage import prepare_stage

    ckpt = stage1 / "checkpoints" / "last.ckpt"
    assert has_model_config(ckpt)
    from_ckpt, from_dir = load_model(ckpt), load_model(stage1)
    assert output_change(from_dir, from_ckpt)["max_abs"] == 0.0
    config = yaml.safe_load((stage1 / "model.yaml").read_text())
    stage = prepare_stage(load_model(stage1), config, str(ckpt), [{"class_path": "insert_depth"}])
    assert stage.history[-1]["class_path"].endswith("InsertDepthGrowth") and stage.new_parameters
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable Lightning checkpoint"):
        load_model(bad)
