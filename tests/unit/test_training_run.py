"""End to end: `mmgrow fit` writes the whole run directory; resume; bad recipes fail with named errors."""

import json
import os
from pathlib import Path

import pytest
import torch

from mmgrow.training.cli import build_cli, resolve_class_path, rewrite_argv
from mmgrow.training.export import CheckpointError, load_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.dim", "32", "--model.depth", "1", "--data.num_train", "32", "--data.num_val", "8",
        "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args", "{video: {grid: 4}}",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]


def _fit(tmp_path, *extra):
    return build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY,
                      "--trainer.max_steps", "3", "--trainer.val_check_interval", "2",
                      "--trainer.default_root_dir", str(tmp_path), *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    cli = _fit(d)
    return d, cli


def test_run_directory_holds_the_evidence(run_dir):
    d, cli = run_dir
    for name in ["config.yaml", "metrics.csv", "checkpoints/last.ckpt", "model.safetensors", "model.yaml",
                 "summary.json", "plots/loss.png", "samples/heldout.png"]:
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    assert len(list((d / "samples").glob("*.gif"))) == 4
    scores = json.loads((d / "samples" / "heldout.json").read_text())
    assert [r["caption"] for r in scores["samples"]] == [c for c, _ in cli.datamodule.heldout_prompts()[:4]]
    assert set(scores["match_rate"]) == {"colour", "motion", "shape"}
    assert not [p for p in d.rglob("*.tmp")], "temporary files left behind"
    s = json.loads((d / "summary.json").read_text())
    assert s["global_step"] == 3 and s["tokens_seen"] > 0 and s["tokens_per_s"] > 0
    assert s["parameters"] == sum(p.numel() for p in cli.model.model.parameters())
    assert s["peak_memory_bytes"] > 0 and s["state_size_per_example"] > 0


def test_saved_config_has_import_paths_and_replays(run_dir, tmp_path):
    d, cli = run_dir
    text = (d / "config.yaml").read_text()
    assert "mmgrow.layers.attention.FullAttention" in text
    assert "mmgrow.objectives.autoregressive.AutoregressiveObjective" in text
    replay = build_cli(["fit", "--config", str(d / "config.yaml"), "--trainer.max_steps", "1",
                        "--trainer.default_root_dir", str(tmp_path)])
    assert replay.model.hparams.dim == cli.model.hparams.dim == 32
    assert (tmp_path / "summary.json").exists()


def test_exported_weights_rebuild_the_trained_model(run_dir):
    d, cli = run_dir
    trained = cli.model.model.eval()
    loaded = load_model(d).eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    ctx = cli.model.objective.context(batch)
    assert torch.equal(trained(batch.input_ids, ctx).hidden, loaded(batch.input_ids, ctx).hidden)


def test_resume_from_last_checkpoint_continues_the_step_count(run_dir, tmp_path):
    d, _ = run_dir
    cli = _fit(tmp_path, "--trainer.max_steps", "5", "--ckpt_path", str(d / "checkpoints/last.ckpt"))
    assert cli.trainer.global_step == 5
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["tokens_seen"] > s["timed_train_tokens"] > 0  # tokens seen before the resume are kept


def test_registry_names_resolve_in_class_path():
    assert resolve_class_path("full") == "mmgrow.layers.attention.FullAttention"
    assert resolve_class_path("mixers:full") == "mmgrow.layers.attention.FullAttention"
    assert resolve_class_path("torch.nn.Linear") == "torch.nn.Linear"
    with pytest.raises(ValueError, match="did you mean 'full'"):
        resolve_class_path("fulll")
    argv = rewrite_argv(["fit", "--model.mixer.class_path", "full", "--model.objective.class_path=autoregressive"])
    assert argv[2] == "mmgrow.layers.attention.FullAttention"
    assert argv[3].endswith("=mmgrow.objectives.autoregressive.AutoregressiveObjective")


def test_missing_init_from_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="init_from path does not exist"):
        _fit(tmp_path, "--model.init_from", str(tmp_path / "missing.safetensors"))
    assert not (tmp_path / "model.safetensors").exists()


def test_inconsistent_recipe_is_rejected_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dimm: 32\n")
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(bad), "--trainer.default_root_dir", str(tmp_path)])
    assert "dimm" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "config.yaml")


def test_config_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TypeError, match="mapping at the top level"):
        build_cli(["fit", "--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        build_cli(["fit", "--config", str(tmp_path / "nope.yaml")])


def test_validate_test_and_predict_from_the_checkpoint(run_dir, tmp_path):
    d, fit_cli = run_dir
    ckpt = str(d / "checkpoints/last.ckpt")
    common = ["--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, "--trainer.default_root_dir", str(tmp_path),
              "--ckpt_path", ckpt]
    val = build_cli(["validate", *common])
    test = build_cli(["test", *common])
    pred = build_cli(["predict", *common])
    # validate on last.ckpt equals the loss of the exported final weights on the first val batch
    model = load_model(d).eval()
    batch = next(iter(val.datamodule.val_dataloader()))
    with torch.no_grad():
        expected, _ = fit_cli.model.objective.loss(model(batch.input_ids, fit_cli.model.objective.context(batch)), batch)
    assert abs(float(val.trainer.callback_metrics["val/loss"]) - float(expected)) < 1e-5
    # test runs on the held-out combinations, which the validation split never contains
    assert float(test.trainer.callback_metrics["test/loss"]) > 0
    heldout = {c for c, _ in test.datamodule.heldout_prompts()}
    assert {test.datamodule.test_set[i].text for i in range(len(test.datamodule.test_set))} <= heldout
    outputs = pred.trainer.predict_loop.predictions
    assert outputs and all(torch.isfinite(o["loss"]) for o in outputs)


def test_console_entry_reports_recipe_errors_in_one_line(tmp_path, capsys):
    from mmgrow.__main__ import main

    assert main(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"mmgrow: error: config file not found: {tmp_path / 'nope.yaml'}"
    assert main(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), "--model.mixer.class_path", "fulll"]) == 2
    assert "did you mean 'full'" in capsys.readouterr().err


def test_multitask_run_writes_videos_and_captions(tmp_path):
    cli = _fit(tmp_path, "--data.tasks", "[text_to_video, video_to_text]", "--trainer.max_steps", "2")
    videos = json.loads((tmp_path / "samples" / "heldout.json").read_text())
    captions = json.loads((tmp_path / "samples" / "captions.json").read_text())
    assert len(videos["samples"]) == 4 and len(captions["samples"]) == 4
    heldout = {c for c, _ in cli.datamodule.heldout_prompts()}
    assert {r["caption"] for r in captions["samples"]} <= heldout
    assert set(captions["match_rate"]) == {"exact", "shape", "colour", "motion"}


def test_captioning_only_run_writes_no_videos(tmp_path):
    _fit(tmp_path, "--data.tasks", "[video_to_text]", "--trainer.max_steps", "1")
    assert (tmp_path / "samples" / "captions.json").exists()
    assert not list((tmp_path / "samples").glob("*.gif"))
