"""``mmgrow generate``: videos from a run directory, for a prompt or a storyboard file."""

import json
from pathlib import Path

import av
import pytest

from mmgrow.__main__ import main
from mmgrow.training.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
         "--data.num_train", "8", "--data.num_val", "2", "--data.batch_size", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]


def frames_in(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def storyboard_run(tmp_path_factory):
    import os

    before = os.getcwd()
    os.chdir(ROOT)  # recipes name pretrained/ relative to the repository root
    run = tmp_path_factory.mktemp("storyboard_run")
    try:  # the shipped latent codec (relative path): an untrained codec would be re-drawn at every load
        build_cli(["fit", "--config", str(ROOT / "recipes/ttt_video/storyboard_cpu.yaml"), "--model.depth", "1",
                   *SHORT, "--trainer.default_root_dir", str(run)])
    finally:
        os.chdir(before)
    return run


def test_generate_a_storyboard_writes_gif_mp4_and_json(storyboard_run, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    board = tmp_path / "board.json"
    board.write_text(json.dumps([{"text": "a red square moves left", "requires_scene_transition": True},
                                 {"text": "a red square moves up", "requires_scene_transition": False},
                                 {"text": "a blue ring moves down", "requires_scene_transition": True}]))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["generate", "--checkpoint", str(storyboard_run), "--storyboard", str(board), "--steps", "2",
                     "--out", str(out), "--seed", "3"]) == 0
        outs.append(out)
    record = json.loads((outs[0] / "generate.json").read_text())
    assert record["settings"]["steps"] == 2 and record["samples"][0]["frames"] == 3 * 2  # 3 scenes x 2 frames
    gif = next(outs[0].glob("*.gif"))
    mp4 = next(outs[0].glob("*.mp4"))
    assert frames_in(mp4) == 6
    assert gif.read_bytes() == (outs[1] / gif.name).read_bytes()  # same seed, same video


def test_generate_errors(storyboard_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(storyboard_run), "--storyboard", str(tmp_path / "none.json")]) == 2
    assert "storyboard file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["generate", "--checkpoint", str(storyboard_run), "--storyboard", str(empty)]) == 2
    assert "scene" in capsys.readouterr().err


def test_generate_from_a_prompt_with_a_token_model(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), "--model.depth", "1", *SHORT,
               "--trainer.default_root_dir", str(run)])
    assert main(["generate", "--checkpoint", str(run), "--prompt", "a red square moves left", "--frames", "2"]) == 0
    record = json.loads((run / "generated" / "generate.json").read_text())
    assert record["samples"][0]["prompt"] == "a red square moves left" and record["samples"][0]["frames"] == 2
    assert frames_in(run / "generated" / record["samples"][0]["files"][1]) == 2
    assert main(["generate", "--checkpoint", str(run), "--prompt", " "]) == 2
