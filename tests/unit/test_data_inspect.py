"""`mmgrow data inspect` on fixture recipes: numbers computed here from first principles.

The fixture uses the ``conditioned_video`` task without a condition encoder, so every example is the
video alone: ``n = 1 + F * (G*G + 1)`` tokens (pixel codec: bov, then per frame G*G cells and an eof).
"""

import json

import pytest

from mmgrow.__main__ import main

FRAMES, GRID = 2, 4
N = 1 + FRAMES * (GRID * GRID + 1)  # tokens per example


def recipe(tmp_path, extra: str = "") -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
trainer:
  accumulate_grad_batches: 2
model:
  dim: 8
data:
  codecs: {{text: bytes, video: pixels}}
  codec_args: {{video: {{grid: {GRID}}}}}
  dataset: shapes
  dataset_args: {{frames: {FRAMES}, size: 16, grid: {GRID}}}
  num_train: 16
  num_val: 4
  batch_size: 5
  seq_len: {N + 10}
  sources:
    - {{name: main, task: conditioned_video}}
    - {{name: extra, task: conditioned_video, every: 4}}
{extra}""")
    return str(path)


def inspect(capsys, *args):
    assert main(["data", "inspect", *args]) == 0
    return capsys.readouterr().out


def test_inspect_json_gives_known_numbers(tmp_path, capsys):
    out = json.loads(inspect(capsys, "--config", recipe(tmp_path), "--batches", "4", "--json"))
    assert set(out) == {"tasks", "rows", "examples_per_row", "padding_fraction", "skipped"}
    # the stream is (4 main, 1 extra) repeated: 20 items = 16 main + 4 extras; one task for two sources,
    # so the sources are keyed by their names
    assert out["tasks"] == {"main": {"examples": 16, "tokens": 16 * N, "weight": pytest.approx(1 / 1.25)},
                            "extra": {"examples": 4, "tokens": 4 * N, "weight": pytest.approx(0.25 / 1.25)}}
    assert out["rows"] == 20 and out["examples_per_row"] == 1.0
    assert out["padding_fraction"] == pytest.approx(10 / (N + 10))
    assert out["skipped"] == []


def test_inspect_follows_the_curriculum_at_a_step(tmp_path, capsys):
    # stage 1 from step 2 = batch 4 (accumulate 2): batch size 3, length N + 30
    stages = f"  curriculum:\n    - {{until: {{step: 2}}}}\n    - {{batch_size: 3, length: {N + 30}}}\n"
    path = recipe(tmp_path, stages)
    out = json.loads(inspect(capsys, "--config", path, "--batches", "2", "--step", "2", "--json"))
    assert out["rows"] == 6 and out["padding_fraction"] == pytest.approx(30 / (N + 30))
    # batches 4 and 5 continue the stream after 20 items: 16 main + 4 extras so far, so the next 6 items are
    # main 17..20, the extra after main 20, then main 21
    assert {k: v["examples"] for k, v in out["tasks"].items()} == {"main": 5, "extra": 1}
    table = inspect(capsys, "--config", path, "--batches", "2", "--step", "2", "--data.seed", "3")
    assert "curriculum stage 1 (stage1)" in table and "rows 6, examples per row 1.000" in table


def test_inspect_errors(tmp_path, capsys):
    path = recipe(tmp_path)
    assert main(["data", "inspect", "--config", path, "--data.batch_size", "zero"]) == 2
    assert "data.batch_size" in capsys.readouterr().err
    assert main(["data", "inspect", "--config", path, "--model.dim", "3"]) == 2
    assert "unknown option --model.dim" in capsys.readouterr().err
    assert main(["data", "frobnicate"]) == 2
    assert "unknown data subcommand 'frobnicate'" in capsys.readouterr().err


def test_help_is_plain_text(capsys):
    assert main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mmgrow data inspect --config RECIPE") and "examples_per_row" in out
    with pytest.raises(SystemExit) as exit_:
        main(["data", "inspect", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--batches" in out and "``" not in out and ":func:" not in out
