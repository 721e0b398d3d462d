"""``mmgrow evaluate needle`` on a tiny run trained for 2 steps: JSON of the right shape and a PNG, the
documented tokens -> haystack conversion, exact accuracy fractions (decoder monkeypatched), real greedy
decoding end to end, one-line errors; and the QA scorer's exact-match rule."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mmgrow.__main__ import main
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.data.synthetic.shapes import ShapesDataset
from mmgrow.evaluation import qa
from mmgrow.protocols import Segment
from mmgrow.tokenizers.pixels import PixelTokenizer
from mmgrow.tokenizers.text import ByteTokenizer
from mmgrow.tokenspace import TokenSpace
from mmgrow.training.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
QUESTION_TOKENS = len("what is the code?") + 2  # bos ... eos
VIDEO_QUESTION_TOKENS = len("what colour was the marked shape?") + 2
TINY = ["--model.dim", "32", "--model.depth", "1", "--data.dataset_args", "{frames: 2, size: 16, grid: 4}",
        "--data.codec_args", "{video: {grid: 4}}", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1", "--data.num_train", "8", "--data.num_val", "2", "--data.batch_size", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("needle_run")
    build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, "--trainer.default_root_dir",
               str(path)])
    return path


def test_json_png_and_exact_fractions(run, tmp_path, monkeypatch):
    """Per cell, the fake decoder answers the first k of 3 samples right: k = 3, 1, 0 for depths 0, 0.5, 1."""
    right_per_depth = {0.0: 3, 0.5: 1, 1.0: 0}
    calls: dict[tuple, int] = {}

    def one(example):
        key = (example.meta["length"], example.meta["depth"])
        calls[key] = calls.get(key, 0) + 1
        return f" {example.answer}\n" if calls[key] <= right_per_depth[example.meta["depth"]] else example.answer + "0"

    def fake(model, objective, builder, examples, condition_encoder=None):
        return [one(e) for e in examples]

    monkeypatch.setattr(qa, "answers", fake)
    out = tmp_path / "out"
    assert main(["evaluate", "needle", "--checkpoint", str(run), "--lengths", "64", "128", "--depths", "0", "0.5", "1",
                 "--samples", "3", "--out", str(out)]) == 0
    result = json.loads((out / "needle.json").read_text())
    assert result["lengths"] == [64, 128] and result["depths"] == [0.0, 0.5, 1.0] and result["samples"] == 3
    assert result["kind"] == "text" and result["checkpoint"] == str(run)
    assert result["accuracy"] == [[1.0, 1 / 3, 0.0], [1.0, 1 / 3, 0.0]]
    # bytes codec: prompt = (n + 2) haystack tokens + the question's tokens <= L
    assert result["haystack_sizes"] == [64 - 2 - QUESTION_TOKENS, 128 - 2 - QUESTION_TOKENS]
    assert result["unit"] == "characters"
    assert sorted(calls.values()) == [3] * 6
    assert (out / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_decoding_text_and_video_into_numbered_eval_dirs(run, capsys):
    for kind, length in (("text", "48"), ("video", "100")):
        assert main(["evaluate", "needle", "--checkpoint", str(run), "--lengths", length, "--depths", "0.5",
                     "--samples", "2", "--kind", kind]) == 0
    first, second = run / "eval" / "needle-0", run / "eval" / "needle-1"
    assert capsys.readouterr().out.split() == [str(first / "needle.json"), str(first / "needle.png"),
                                               str(second / "needle.json"), str(second / "needle.png")]
    text, video = (json.loads((d / "needle.json").read_text()) for d in (first, second))
    assert text["accuracy"][0][0] in (0.0, 0.5, 1.0)
    # pixel codec, grid 4: bov + F * (16 cells + eof/eov) tokens, then the question
    assert video["haystack_sizes"] == [(100 - 1 - VIDEO_QUESTION_TOKENS) // 17] and video["unit"] == "frames"


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "--lengths must be a positive int, got 0"),
    (["--lengths", "64", "--depths", "1.5"], r"--depths must be a finite number in [0, 1], got 1.5"),
    (["--lengths", "64", "--samples", "0"], "--samples must be a positive int"),
    (["--lengths", "30"], "--lengths 30: too short for a text needle"),
])
def test_bad_arguments_are_one_line_errors(run, argv, message, capsys):
    assert main(["evaluate", "needle", "--checkpoint", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmgrow: error: ") and message in err and err.count("\n") == 1
    if "too short" in message:
        assert f"use lengths >= {15 + 2 + QUESTION_TOKENS}" in err


def test_missing_or_unsealed_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["evaluate", "needle", "--checkpoint", str(tmp_path / "nope"), "--lengths", "64"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("data: {}\n")
    assert main(["evaluate", "needle", "--checkpoint", str(tmp_path), "--lengths", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmgrow: error: ") and "incomplete" in err


class ScriptedObjective:
    """Returns the text tokens it is given, whatever the prompt: tests the budget, cut and decode of answers."""

    def __init__(self, text: str) -> None:
        self.ids = ByteTokenizer().encode(text, add_bos=False, add_eos=False)

    def generate(self, model, ids, *, modality, max_new_tokens, **kw):
        out = torch.cat([self.ids, torch.full((max_new_tokens,), ByteTokenizer().eos_id)])[:max_new_tokens]
        return out[None].expand(ids.shape[0], -1)


class Stub(nn.Module):
    def __init__(self, space: TokenSpace) -> None:
        super().__init__()
        self.token_space, self.w = space, nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("said, right", [("47", True), ("4", False), ("479", False), ("47 ", True)])
def test_decoded_answer_is_exact_match(said, right):
    builder = SequenceBuilder({"text": ByteTokenizer()})
    example = qa.QAExample([Segment("text", "what is the code?", "input")], "47")
    predicted = qa.decode_answer(Stub(builder.token_space), ScriptedObjective(said), builder, example)
    assert qa.is_correct(predicted, "47") is right
    assert qa.greedy_answer_accuracy(Stub(builder.token_space), ScriptedObjective(said), builder,
                                     [example, example]) == float(right)


def per_example(answer):
    """A stand-in for ``qa.answers`` that answers each example with ``answer(example)``."""
    return lambda model, objective, builder, examples, condition_encoder=None: [answer(e) for e in examples]


def test_video_qa_accuracy_per_kind(monkeypatch):
    """A decoder that knows only colours scores 1 on colour questions, 0 elsewhere, and the colour share overall."""
    monkeypatch.setattr(qa, "answers", per_example(lambda e: e.answer if "colour" in e.prompt[1].raw else "?"))
    builder = SequenceBuilder({"text": ByteTokenizer(), "video": PixelTokenizer(grid=8)})
    ds = ShapesDataset(num_samples=40, frames=3, size=16, grid=8)
    score = qa.video_qa_accuracy(None, None, builder, ds)
    assert score["samples"] == 40 and sum(score["counts"].values()) == 40
    assert score["per_kind"]["colour"] == 1.0 and all(v == 0.0 for k, v in score["per_kind"].items() if k != "colour")
    assert score["accuracy"] == score["counts"]["colour"] / 40


def test_callback_writes_the_grid_at_fit_end(tmp_path, monkeypatch):
    from mmgrow.training.needle_callback import NeedleEvaluation

    monkeypatch.setattr(qa, "answers", per_example(lambda e: e.answer if e.meta["depth"] == 0 else ""))
    cli = build_cli(["--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, "--trainer.default_root_dir",
                     str(tmp_path)], run=False)
    cli.trainer.callbacks.append(NeedleEvaluation(lengths=[40, 60], depths=[0, 1], samples=2))
    cli.trainer.fit(cli.model, cli.datamodule)
    result = json.loads((tmp_path / "eval" / "needle-0" / "needle.json").read_text())
    assert result["accuracy"] == [[1.0, 0.0], [1.0, 0.0]]
    assert result["haystack_sizes"] == [40 - 2 - QUESTION_TOKENS, 60 - 2 - QUESTION_TOKENS]
    assert (tmp_path / "eval" / "needle-0" / "needle.png").is_file()
    with pytest.raises(ValueError, match="depths must be a finite number in"):
        NeedleEvaluation(depths=[2])
    with pytest.raises(ValueError, match="lengths must be a positive int"):
        NeedleEvaluation(lengths=[0])


def test_text_only_needle_run_trains_and_evaluates(tmp_path, capsys):
    """A run with only a text codec trains on text needles (the default caption sampler skips it: no video)
    and `evaluate needle` reads it; a video needle on it is a one-line error."""
    run = tmp_path / "run"
    build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, "--data.tasks", "[needle_text]",
               "--data.codecs", "{text: bytes}", "--data.codec_args", "{}", "--data.dataset", "needle",
               "--data.dataset_args", "{kind: text, length: 64}", "--model.objective.init_args.modality_weights",
               "{text: 1.0}", "--trainer.default_root_dir", str(run)])
    assert (run / "manifest.json").is_file() and not (run / "samples" / "captions.json").exists()
    assert main(["evaluate", "needle", "--checkpoint", str(run), "--lengths", "50", "--depths", "0", "1",
                 "--samples", "1"]) == 0
    result = json.loads((run / "eval" / "needle-0" / "needle.json").read_text())
    assert result["haystack_sizes"] == [50 - 2 - QUESTION_TOKENS] and len(result["accuracy"][0]) == 2
    capsys.readouterr()
    assert main(["evaluate", "needle", "--checkpoint", str(run), "--lengths", "50", "--kind", "video"]) == 2
    assert "(try --kind text)" in capsys.readouterr().err
