"""``mmgrow merge``: float64 weight interpolation of runs of one architecture, its checks, its output
directory and the lambda sweep."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmgrow.__main__ import main
from mmgrow.layers.attention import FullAttention
from mmgrow.merge import (
    MergeError,
    check_same_architecture,
    check_weights,
    config_differences,
    merge_state_dicts,
    parse_weights,
    state_differences,
)
from mmgrow.models.factories import spec_from_factory
from mmgrow.models.unified import UnifiedModel
from mmgrow.rundir import check_run, save_model, seal_run
from mmgrow.training.export import load_model

VOCAB = {"text": 11, "video": 7}
ROOT = Path(__file__).resolve().parents[2]


def _config(dim=16, depth=2, heads=2):
    return {"token_space": dict(VOCAB), "dim": dim, "depth": depth,
            "mixer": spec_from_factory(functools.partial(FullAttention, num_heads=heads))}


def _save(path, seed, dim=16, depth=2, heads=2, run=False):
    """A tiny random model saved as a model directory (``run``: a sealed run directory with a recipe)."""
    torch.manual_seed(seed)
    model = UnifiedModel(token_space=VOCAB, dim=dim, depth=depth,
                         mixer=functools.partial(FullAttention, num_heads=heads), init_std=0.5)
    save_model(model, _config(dim, depth, heads), path)
    if run:
        (path / "config.yaml").write_text(f"# recipe of {path.name}\nseed_everything: {seed}\n")
        seal_run(path, ["model.safetensors", "model.yaml", "config.yaml"])
    return model.state_dict()


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


# -- the arithmetic -------------------------------------------------------------------------------------------
def test_self_merge_is_bit_identical_in_every_dtype():
    torch.manual_seed(0)
    state = {"f32": torch.randn(40), "f64": torch.randn(40, dtype=torch.float64),
             "bf16": torch.randn(40).to(torch.bfloat16), "steps": torch.arange(5)}
    for weights in ([0.5, 0.5], [0.1, 0.2, 0.7], [1 / 3] * 3):
        merged = merge_state_dicts([state] * len(weights), weights)
        for name, tensor in state.items():
            assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), (name, weights)


def test_self_merge_of_a_saved_run_through_the_cli(tmp_path):
    a = _save(tmp_path / "a", 0, run=True)
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "a"), "--weights", "0.2,0.3,0.5",
                 "--out", str(tmp_path / "m")]) == 0
    merged = _tensors(tmp_path / "m")
    assert set(merged) == set(a) and all(torch.equal(merged[k], a[k]) for k in a)


def test_endpoints_are_exact(tmp_path):
    a, b = _save(tmp_path / "a", 0), _save(tmp_path / "b", 1)
    assert not torch.equal(a["backbone.blocks.0.mixer.q_proj.weight"], b["backbone.blocks.0.mixer.q_proj.weight"])
    for weights, expected in (("1,0", a), ("0,1", b)):
        out = tmp_path / f"m{weights}"
        assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", weights, "--out", str(out)]) == 0
        merged = _tensors(out)
        assert all(torch.equal(merged[k], expected[k]) and merged[k].dtype == expected[k].dtype for k in expected)


def test_three_run_merge_equals_a_float64_reference(tmp_path):
    """Bit-equal to the documented formula evaluated in float64 by numpy (left to right, then cast), and within
    half a float32 ulp of the exactly rounded sum (math.fsum), a bound a float32 sum does not meet."""
    import numpy as np

    states = [_save(tmp_path / n, seed) for n, seed in (("a", 0), ("b", 1), ("c", 2))]
    weights = [0.2, 0.3, 0.5]
    assert main(["merge", *(str(tmp_path / n) for n in "abc"), "--weights", "0.2,0.3,0.5",
                 "--out", str(tmp_path / "m")]) == 0
    merged = _tensors(tmp_path / "m")
    naive_outside = False
    for name in states[0]:
        arrays = [s[name].numpy().astype(np.float64) for s in states]
        formula = (weights[0] * arrays[0] + weights[1] * arrays[1]) + weights[2] * arrays[2]
        assert merged[name].dtype == torch.float32
        assert np.array_equal(merged[name].numpy(), formula.astype(np.float32)), name
        columns = zip(*(a.flatten().tolist() for a in arrays), strict=True)
        exact = torch.tensor([math.fsum(w * x for w, x in zip(weights, col, strict=True)) for col in columns],
                             dtype=torch.float64).reshape(states[0][name].shape)
        bound = exact.abs() * (2.0 ** -24 + 1e-15)  # correct float32 rounding, plus the float64 sum's error
        assert bool(((merged[name].double() - exact).abs() <= bound).all()), name
        naive = sum(torch.tensor(w, dtype=torch.float32) * s[name] for w, s in zip(weights, states, strict=True))
        naive_outside |= not bool(((naive.double() - exact).abs() <= bound).all())
    assert naive_outside  # the bound is sharp enough to tell a float32 sum apart


def test_non_float_tensors_must_be_equal():
    a = {"w": torch.zeros(3), "count": torch.tensor([1, 2])}
    b = {"w": torch.ones(3), "count": torch.tensor([1, 3])}
    with pytest.raises(MergeError, match=r"tensor 'count' \(torch.int64\) differs between run 1 and run 2"):
        merge_state_dicts([a, b], [0.5, 0.5])


# -- weights ---------------------------------------------------------------------------------------------------
def test_weights_default_equal_sum_rule_and_normalize():
    assert check_weights(None, 4) == [0.25] * 4
    assert check_weights([0.3, 0.7], 2) == [0.3, 0.7]
    assert check_weights([0.3, 0.7 + 5e-7], 2) == [0.3, 0.7 + 5e-7]  # within the tolerance
    with pytest.raises(MergeError, match=r"sum to 0\.9, not 1 .*--normalize"):
        check_weights([0.4, 0.5], 2)
    with pytest.raises(MergeError, match=r"sum to 1\.00001"):
        check_weights([0.5, 0.50001], 2)
    assert check_weights([1, 3], 2, normalize=True) == [0.25, 0.75]
    with pytest.raises(MergeError, match="weight 2 is -0.5; every weight must be a finite number >= 0"):
        check_weights([1.5, -0.5], 2)
    with pytest.raises(MergeError, match="weight 1 is nan"):
        check_weights([float("nan"), 1.0], 2, normalize=True)
    with pytest.raises(MergeError, match="sum to 0.0; --normalize needs a positive sum"):
        check_weights([0, 0], 2, normalize=True)
    assert parse_weights(" 0.25, 0.75 ", 2) == [0.25, 0.75]
    with pytest.raises(MergeError, match="'x' is not a number; expected 2 comma-separated numbers such as 0.5,0.5"):
        parse_weights("0.5,x", 2)
    with pytest.raises(MergeError, match="gives 3 weights for 2 runs"):
        parse_weights("0.2,0.3,0.5", 2)


@pytest.mark.parametrize(("weights", "message"), [
    ("a,b", "--weights 'a,b': 'a' is not a number"),
    ("0.5", "--weights '0.5' gives 1 weights for 2 runs"),
    ("0.5,", "'' is not a number"),
    ("0.5,0.6", "sum to 1.1"),
    ("inf,0", "weight 1 is inf"),
])
def test_bad_weights_strings_exit_2_with_one_line(tmp_path, capsys, weights, message):
    _save(tmp_path / "a", 0)
    _save(tmp_path / "b", 1)
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), f"--weights={weights}",
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmgrow: error: ") and message in err
    assert not (tmp_path / "m").exists()


def test_normalize_through_the_cli_is_recorded(tmp_path):
    a, b = _save(tmp_path / "a", 0), _save(tmp_path / "b", 1)
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1,3", "--normalize",
                 "--out", str(tmp_path / "m")]) == 0
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["weights"] == [0.25, 0.75] and record["normalized"] is True
    key = "backbone.blocks.1.mlp.w_down.weight"
    expected = (0.25 * a[key].double() + 0.75 * b[key].double()).float()
    assert torch.equal(_tensors(tmp_path / "m")[key], expected)


# -- architecture ---------------------------------------------------------------------------------------------
def test_mismatched_dims_error_names_the_keys(tmp_path, capsys):
    _save(tmp_path / "a", 0)
    _save(tmp_path / "b", 1, dim=32, heads=4)
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b'} has a different architecture from {tmp_path / 'a'}" in err
    assert "model.yaml differs in 2 key(s): dim: 16 vs 32, mixer.init_args.num_heads: 2 vs 4" in err


def test_config_and_tensor_differences_are_listed_with_a_count():
    assert config_differences({"a": {"b": 1, "c": [1, 2]}, "x": 1}, {"a": {"b": 2, "c": [1, 2]}, "y": 1}) == [
        "a.b: 1 vs 2", "x (only in the first)", "y (only in the second)"]
    a = {f"t{i:02d}": torch.zeros(2) for i in range(14)}
    b = {**{k: torch.zeros(3) for k in list(a)[:12]}, "extra": torch.zeros(1)}
    assert state_differences({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)}) == [
        "w: (2,) torch.float32 vs (2,) torch.float64"]
    with pytest.raises(MergeError, match=r"15 tensor\(s\) differ: t12 \(missing in the second\), .* and 5 more$"):
        check_same_architecture(["A", "B"], [{}, {}], [a, b])


def test_missing_tensor_names_it_and_the_run(tmp_path, capsys):
    _save(tmp_path / "a", 0)
    _save(tmp_path / "b", 1)
    tensors = _tensors(tmp_path / "b")
    del tensors["backbone.blocks.1.mixer.q_proj.weight"]
    save_file(tensors, str(tmp_path / "b" / "model.safetensors"))
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"weights in {tmp_path / 'b'} do not fit the model: missing ['backbone.blocks.1.mixer.q_proj.weight']" in err


def test_grown_and_directly_built_models_are_refused(tmp_path):
    from mmgrow.growth.base import apply_growth, spec_of
    from mmgrow.growth.depth import InsertDepthGrowth
    from mmgrow.merge import load_sources

    torch.manual_seed(0)
    grown = UnifiedModel(token_space=VOCAB, dim=16, depth=2, mixer=functools.partial(FullAttention, num_heads=2))
    strategy = InsertDepthGrowth(count=2)
    apply_growth(grown, [strategy])
    save_model(grown, {**_config(), "growth": [spec_of(strategy)]}, tmp_path / "grown")
    direct = _save(tmp_path / "direct", 1, depth=4)
    assert set(direct) == set(grown.state_dict())  # same tensors: only the configs tell them apart
    with pytest.raises(MergeError, match=r"differs in 2 key\(s\): depth: 2 vs 4, growth \(only in the first\)"):
        load_sources([tmp_path / "grown", tmp_path / "direct"])


def test_an_incomplete_run_is_refused(tmp_path, capsys):
    _save(tmp_path / "a", 0, run=True)
    _save(tmp_path / "b", 1, run=True)
    (tmp_path / "b" / "manifest.json").unlink()
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    assert f"run directory {tmp_path / 'b'} is incomplete" in capsys.readouterr().err


# -- the output directory -----------------------------------------------------------------------------------
def test_output_is_a_sealed_run_that_load_model_reads(tmp_path, capsys):
    a, b = _save(tmp_path / "a", 0, run=True), _save(tmp_path / "b", 1, run=True)
    out = tmp_path / "m"
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0  # equal weights
    assert str(out / "model.safetensors") in capsys.readouterr().out
    manifest = check_run(out)  # sizes and SHA-256 against manifest.json
    assert sorted(manifest["files"]) == ["config.yaml", "merge.json", "model.safetensors", "model.yaml"]
    assert (out / "config.yaml").read_bytes() == (tmp_path / "a" / "config.yaml").read_bytes()
    assert yaml.safe_load((out / "model.yaml").read_text()) == _config()
    record = json.loads((out / "merge.json").read_text())
    model = load_model(out)
    assert record == {"runs": [str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve())],
                      "weights": [0.5, 0.5], "normalized": False, "tensors": len(a),
                      "parameters": sum(p.numel() for p in model.parameters())}
    for k, v in model.state_dict().items():
        assert torch.equal(v, (0.5 * a[k].double() + 0.5 * b[k].double()).to(v.dtype)), k
    # a second merge into it needs --force, and then replaces the files and the seal
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 2
    assert "exists and is not empty; choose a new directory or pass --force" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1,0", "--out", str(out),
                 "--force"]) == 0
    check_run(out)
    assert all(torch.equal(load_model(out).state_dict()[k], a[k]) for k in a)


def test_output_may_not_be_an_input_and_runs_must_be_two(tmp_path, capsys):
    _save(tmp_path / "a", 0)
    _save(tmp_path / "b", 1)
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "b"), "--force"]) == 2
    assert "is one of the runs being merged" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 2
    assert "give at least two runs to merge, got 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # refused before anything was written


# -- the sweep -------------------------------------------------------------------------------------------------
class _MeanObjective:
    """A stand-in objective whose loss is linear in the weights: mean of one tensor times the batch value."""

    def step(self, model, batch):
        return model.state_dict()["heads.text.weight"].double().mean() * batch, {}


class _Data:
    def __init__(self):
        self.source_sets = {"train": [], "val": [], "heldout": []}

    def eval_keys(self, split):
        return [0, 1, 2]

    def batch_builder(self, split):
        return {0: 1.0, 1: 2.0, 2: 100.0} if split == "val" else {0: -1.0, 1: -1.0, 2: -1.0}


def test_sweep_evaluates_the_interpolated_weights(tmp_path, monkeypatch):
    """The stand-in loss and task metric are linear in the weights, so along lambda they must run linearly
    from the first run's value to the second's: the sweep really evaluates (1 - lambda) A + lambda B."""
    from mmgrow.evaluation import tasks as task_eval
    from mmgrow.training import generate_cli

    a, b = _save(tmp_path / "a", 0, run=True), _save(tmp_path / "b", 1, run=True)
    with torch.no_grad():
        a_model = load_model(tmp_path / "a")
    key = "heads.text.weight"
    assert key in a and not torch.equal(a[key], b[key])
    monkeypatch.setattr(generate_cli, "load_run", lambda run: (a_model, _MeanObjective(), _Data()))
    monkeypatch.setattr(generate_cli, "load_run_data", lambda run: _Data())
    calls = []

    def fake_tasks(model, objective, datamodule, split="val", num_samples=32):
        calls.append((split, num_samples))
        value = float(model.state_dict()[key].double().sum())
        return {"qa": {"task": "image_qa", "samples": num_samples, "accuracy": value, "bleu": 0.0}}

    monkeypatch.setattr(task_eval, "evaluate_tasks", fake_tasks)
    out = tmp_path / "sweep"
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--sweep", "--points", "5", "--batches", "2",
                 "--samples", "3", "--out", str(out)]) == 0
    result = json.loads((out / "merge_sweep.json").read_text())
    assert result["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert calls == [("val", 3), ("heldout", 3)] * 5
    mean_a, mean_b = a[key].double().mean().item(), b[key].double().mean().item()
    for lam, val, held in zip(result["lambdas"], result["splits"]["val"]["loss"], result["splits"]["heldout"]["loss"],
                              strict=True):
        expected = (1 - lam) * mean_a + lam * mean_b
        assert val == pytest.approx(1.5 * expected, rel=1e-6)  # batches 1.0 and 2.0 only (--batches 2)
        assert held == pytest.approx(-expected, rel=1e-6)
    accuracy = result["splits"]["val"]["tasks"]["qa"]["accuracy"]
    assert accuracy[0] == pytest.approx(a[key].double().sum().item(), rel=1e-6)
    assert accuracy[-1] == pytest.approx(b[key].double().sum().item(), rel=1e-6)
    assert (out / "merge_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "model.safetensors").exists()  # no --weights: the sweep writes no merged model


def test_sweep_arguments_are_checked_before_loading(tmp_path, capsys):
    for n in "abc":
        _save(tmp_path / n, 0)
    runs = [str(tmp_path / n) for n in "abc"]
    assert main(["merge", *runs, "--sweep", "--out", str(tmp_path / "s")]) == 2
    assert "--sweep interpolates between exactly two runs, got 3" in capsys.readouterr().err
    assert main(["merge", *runs[:2], "--sweep", "--points", "1", "--out", str(tmp_path / "s")]) == 2
    assert "--points" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_on_two_tiny_real_runs(tmp_path, monkeypatch):
    """Two 6-step fits of the quickstart recipe with video-QA tasks (different seeds; B asks only colour
    questions, as its own source), then a 3-point sweep: its end points' losses (on A's data) and the
    accuracies of both runs' tasks are each run's own, computed here independently of the sweep."""
    from mmgrow.evaluation.tasks import evaluate_tasks
    from mmgrow.training.generate_cli import load_run
    from mmgrow.training.merge_cli import split_loss

    monkeypatch.chdir(ROOT)
    short = ["--model.dim", "16", "--model.depth", "1", "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
             "--trainer.limit_val_batches", "1", "--data.num_train", "16", "--data.num_val", "4", "--data.batch_size",
             "2", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]
    data = {"a": ["--data.tasks", "[text_to_video, video_qa]"],  # video_qa is scored: the sweep has task metrics
            "b": ["--data.sources", ("[{task: text_to_video}, {name: colour_qa, task: video_qa, "
                                     "task_args: {kinds: [colour]}}]")]}
    for name, seed in (("a", 0), ("b", 1)):
        assert main(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *short, *data[name], "--seed_everything",
                     str(seed), "--trainer.default_root_dir", str(tmp_path / name)]) == 0
    out = tmp_path / "sweep"
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--sweep", "--points", "3", "--batches", "2",
                 "--weights", "0.5,0.5", "--out", str(out)]) == 0
    result = json.loads((out / "merge_sweep.json").read_text())
    assert len(result["splits"]["val"]["loss"]) == 3
    assert result["splits"]["val"]["loss"][0] != result["splits"]["val"]["loss"][-1]  # the runs differ
    dm_a, dm_b = load_run(tmp_path / "a")[2], load_run(tmp_path / "b")[2]
    for index, name in ((0, "a"), (-1, "b")):
        model, objective, _ = load_run(tmp_path / name)
        for split in ("val", "heldout"):
            tasks = result["splits"][split]["tasks"]
            assert set(tasks) == {"video_qa", "colour_qa"}  # both runs' scored sources
            assert result["splits"][split]["loss"][index] == pytest.approx(
                split_loss(model, objective, dm_a, split, 2), rel=1e-6)
            for source, dm in (("video_qa", dm_a), ("colour_qa", dm_b)):
                own = evaluate_tasks(model, objective, dm, split, 16)[source]
                assert tasks[source]["accuracy"][index] == own["accuracy"]
    check_run(out)  # --weights with --sweep: the merged model is written and sealed too
    load_run(out)
