"""Bad input fails at once with one line naming the field, the value and what is expected.

Every case is one row: ``CLI_CASES`` run the console entry in-process (exit code 2, exactly one
``mmgrow: error:`` line on stderr matching the pattern, no traceback); ``API_CASES`` call the Python
API (the exception type and pattern). ``{d}`` in a CLI row is the folder of the :func:`files` fixture
(bad files, a tiny recipe, a tiny run directory). A new case joins with one line.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import pytest
import torch

import mmgrow
from mmgrow.__main__ import main
from mmgrow.cli_errors import run_command
from mmgrow.protocols import SeqContext
from mmgrow.rundir import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = {"num_train": 4, "num_val": 2, "batch_size": 2, "dataset_args": {"frames": 2, "size": 32},
             "codec_args": {"video": {"grid": 4}}}
TINY_RECIPE = f"""\
trainer: {{max_steps: 1, accelerator: cpu, devices: 1, enable_progress_bar: false, logger: false,
          enable_checkpointing: false, limit_val_batches: 0}}
model: {{dim: 32, depth: 1}}
data: {TINY_DATA}
"""
FIT = ["fit", "--config", "{d}/tiny.yaml", "--trainer.default_root_dir", "{d}/runs"]
BOUNDED = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
           "--trainer.enable_checkpointing", "false", "--data.init_args.num_train", "2", "--data.init_args.num_val", "1"]
GEN = ["generate", "--checkpoint", "{d}/run", "--out", "{d}/generated"]
GROW = ["grow", "--growth", "stack"]

CLI_CASES = [  # (id, argv, pattern of the one error line)
    ("config_empty", ["fit", "--config", "{d}/empty.yaml"], r"config \S+empty\.yaml is empty"),
    ("config_only_comments", ["fit", "--config", "{d}/comments.yaml"], r"config \S+comments\.yaml is empty"),
    ("config_section_not_mapping", ["fit", "--config", "{d}/model5.yaml"], r"section 'model' must be a mapping.*got int 5"),
    ("config_not_utf8", ["fit", "--config", "{d}/latin1.yaml"], r"config \S+latin1\.yaml is not UTF-8 text: byte 0xe9 at offset 30"),
    ("fit_without_bound", ["fit", "--config", "{d}/unbounded.yaml"], r"trainer\.max_steps is not set .*would not stop"),
    ("dim_negative", [*FIT, "--model.dim", "-64"], r"MMGrowModule: dim must be a positive int, got -64"),
    ("depth_zero", [*FIT, "--model.depth", "0"], r"MMGrowModule: depth must be a positive int, got 0"),
    ("lr_zero", [*FIT, "--model.lr", "0"], r"MMGrowModule: lr must be a finite number > 0, got 0"),
    ("lr_infinite", [*FIT, "--model.lr", ".inf"], r"MMGrowModule: lr must be a finite number > 0, got inf"),
    ("warmup_steps_negative", [*FIT, "--model.warmup_steps", "-10"], r"MMGrowModule: warmup_steps must be an int >= 0, got -10"),
    ("min_lr_ratio_above_one", [*FIT, "--model.min_lr_ratio", "1.5"], r"MMGrowModule: min_lr_ratio must be a finite number in \[0, 1\], got 1\.5"),
    ("beta_one", [*FIT, "--model.betas", "[0.9, 1.0]"], r"MMGrowModule: betas\[1\] must be < 1"),
    ("mlp_chunk_zero", [*FIT, "--model.mlp_chunk", "0"], r"MMGrowModule: mlp_chunk must be a positive int, got 0"),
    ("num_train_zero", [*FIT, "--data.num_train", "0"], r"MMDataModule: num_train must be a positive int, got 0"),
    ("num_val_zero", [*FIT, "--data.num_val", "0"], r"MMDataModule: num_val must be a positive int, got 0"),
    ("num_workers_negative", [*FIT, "--data.num_workers", "-1"], r"MMDataModule: num_workers must be an int >= 0, got -1"),
    ("codec_warmup_negative", ["fit", "--config", str(ROOT / "recipes/codecs/vq_video.yaml"), *BOUNDED, "--model.init_args.warmup_steps", "-10"], r"CodecModule: warmup_steps must be an int >= 0, got -10"),
    ("ckpt_path_empty", [*FIT, "--ckpt_path", "{d}/empty.ckpt"], r"--ckpt_path \S+empty\.ckpt is empty \(0 bytes\)"),
    ("ckpt_path_corrupt", [*FIT, "--ckpt_path", "{d}/corrupt.ckpt"], r"--ckpt_path \S+corrupt\.ckpt is not a readable Lightning checkpoint"),
    ("ckpt_path_truncated", [*FIT, "--ckpt_path", "{d}/truncated.ckpt"], r"--ckpt_path \S+truncated\.ckpt is not a readable Lightning checkpoint"),
    ("init_from_empty_ckpt", [*FIT, "--model.init_from", "{d}/empty.ckpt"], r"init_from \S+empty\.ckpt is empty \(0 bytes\)"),
    ("init_from_nan_weights", [*FIT, "--model.init_from", "{d}/nanrun"], r"NaN or inf values in tensor 'embed\.weight'"),
    ("generate_frames_zero", [*GEN, "--prompt", "a red square", "--frames", "0"], r"--frames must be a positive int, got 0"),
    ("generate_frames_negative", [*GEN, "--prompt", "a red square", "--frames", "-3"], r"--frames must be a positive int, got -3"),
    ("generate_steps_zero", [*GEN, "--prompt", "a red square", "--steps", "0"], r"--steps must be a positive int, got 0"),
    ("generate_prompt_too_long", [*GEN, "--prompt", "a" * 96_000], r"--prompt has 96,000 characters; at most 1,000"),
    ("generate_prompt_not_utf8", [*GEN, "--prompt", "a \udce9 square"], r"--prompt is not UTF-8 text: byte 0xe9 at character 2"),
    ("generate_storyboard_not_utf8", [*GEN, "--storyboard", "{d}/latin1.json"], r"storyboard \S+latin1\.json is not UTF-8 text: byte 0xe9 at offset 14"),
    ("generate_out_is_a_file", [*GEN[:3], "--out", "{d}/a_file", "--prompt", "a red square"], r"--out \S+a_file is an existing file"),
    ("grow_out_is_a_file", [*GROW, "--from", "{d}/run", "--out", "{d}/a_file"], r"--out \S+a_file is an existing file"),
    ("grow_growth_not_utf8", ["grow", "--from", "{d}/run", "--growth", "{d}/latin1.yaml", "--out", "{d}/g"], r"--growth file \S+latin1\.yaml is not UTF-8 text"),
    ("grow_from_empty_ckpt", [*GROW, "--from", "{d}/empty.ckpt", "--out", "{d}/g"], r"checkpoint \S+empty\.ckpt is empty \(0 bytes\)"),
    ("grow_from_corrupt_ckpt", [*GROW, "--from", "{d}/corrupt.ckpt", "--out", "{d}/g"], r"checkpoint \S+corrupt\.ckpt is not a readable Lightning checkpoint"),
]


def _mixer(kind: str, name: str, **kw):
    return mmgrow.create(kind, name, dim=32, layer_idx=1, **kw)


def _float64_into(kind: str, name: str):
    return lambda: _mixer(kind, name)(torch.randn(1, 4, 32, dtype=torch.float64), SeqContext.simple(1, 4))


def _ttt_op(module: str, function: str, mini_batch_size: int):
    def call():
        import importlib

        op = getattr(importlib.import_module(f"mmgrow.ops.{module}"), function)
        layer = _mixer("memory", "ttt_linear", num_heads=4, mini_batch_size=4)
        q = torch.randn(1, 4, 6, 8)
        op(q, q, q, torch.ones(1, 4, 6), torch.ones(1, 6), layer._inner_params(), mini_batch_size=mini_batch_size)
    return call


def _load_nan_weights(tmp_path: Path):
    from mmgrow.rundir import load_weights_into, save_model

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 1] = math.nan
    save_model(model, {"token_space": {}}, tmp_path)
    load_weights_into(torch.nn.Linear(2, 2), tmp_path)


def _read_empty_ckpt(tmp_path: Path):
    from mmgrow.rundir import read_weights

    (tmp_path / "x.ckpt").write_bytes(b"")
    read_weights(tmp_path / "x.ckpt")


API_CASES = [  # (id, call(tmp_path), exception type, pattern)
    ("float64_into_attention", lambda _: _float64_into("mixers", "full")(), TypeError, r"FullAttention \(layer 1\): x has dtype torch\.float64 but the layer's parameters are torch\.float32"),
    ("float64_into_mamba2", lambda _: _float64_into("mixers", "mamba2")(), TypeError, r"Mamba2 \(layer 1\): x has dtype torch\.float64"),
    ("float64_into_ttt", lambda _: _float64_into("memory", "ttt_mlp")(), TypeError, r"TTTMLP \(layer 1\): x has dtype torch\.float64"),
    ("ttt_dual_mini_batch_zero", lambda _: _ttt_op("ttt_dual", "ttt_dual", 0)(), ValueError, r"mini_batch_size must be a positive int, got 0"),
    ("ttt_primal_mini_batch_zero", lambda _: _ttt_op("ttt_primal", "ttt_primal", 0)(), ValueError, r"mini_batch_size must be a positive int, got 0"),
    ("ttt_layer_mini_batch_zero", lambda _: _mixer("memory", "ttt_linear", mini_batch_size=0), ValueError, r"mini_batch_size must be a positive int, got 0"),
    ("weights_with_nan", _load_nan_weights, CheckpointError, r"NaN or inf values in tensor 'weight'"),
    ("empty_ckpt", _read_empty_ckpt, ValueError, r"x\.ckpt is empty \(0 bytes\)"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad files, a tiny recipe and a tiny run directory (built, not trained: no fit needed)."""
    import yaml

    from mmgrow.data.datamodule import MMDataModule
    from mmgrow.rundir import save_model, seal_run
    from mmgrow.training.module import MMGrowModule

    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "tiny.yaml").write_text(TINY_RECIPE)
    (d / "unbounded.yaml").write_text(TINY_RECIPE.replace("max_steps: 1, ", ""))
    (d / "empty.yaml").write_text("")
    (d / "comments.yaml").write_text("# nothing yet\n")
    (d / "model5.yaml").write_text("trainer: {max_steps: 1}\nmodel: 5\n")
    (d / "latin1.yaml").write_bytes("trainer: {max_steps: 1}  # caf\u00e9\n".encode("latin-1"))
    (d / "latin1.json").write_bytes('[{"text": "caf\u00e9"}]'.encode("latin-1"))
    (d / "a_file").write_text("not a directory")
    (d / "empty.ckpt").write_bytes(b"")
    (d / "corrupt.ckpt").write_bytes(bytes(range(256)) * 2)
    torch.save({"state_dict": {"model.w": torch.zeros(64, 64)}}, d / "whole.ckpt")
    (d / "truncated.ckpt").write_bytes((d / "whole.ckpt").read_bytes()[: (d / "whole.ckpt").stat().st_size // 2])
    assert zipfile.is_zipfile(d / "whole.ckpt")
    dm = MMDataModule(**TINY_DATA)
    module = MMGrowModule(vocab=dm.vocab, dim=32, depth=1)
    module.configure_model()
    save_model(module.model, module.model_config(), d / "run")
    (d / "run" / "config.yaml").write_text(yaml.safe_dump({"data": TINY_DATA, "model": {"dim": 32, "depth": 1}}))
    seal_run(d / "run", ["model.safetensors", "model.yaml"])  # a complete run: only the arguments are bad
    with torch.no_grad():
        next(module.model.parameters()).view(-1)[0] = math.nan
    save_model(module.model, module.model_config(), d / "nanrun")
    return d


@pytest.mark.parametrize(("argv", "pattern"), [pytest.param(a, p, id=i) for i, a, p in CLI_CASES])
def test_cli_bad_input_is_one_line(files, argv, pattern, capsys, monkeypatch):
    monkeypatch.delenv("MMGROW_DEBUG", raising=False)
    monkeypatch.chdir(files)
    code = main([a.replace("{d}", str(files)) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmgrow: error:")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(errors) == 1, err[-2000:]
    assert errors[0] == errors[0].strip() and len(errors[0]) < 400
    assert re.search(pattern, errors[0]), errors[0]
    assert not (files / "generated").exists() and not (files / "g").exists(), "the work ran before the check"


@pytest.mark.parametrize(("call", "exc", "pattern"), [pytest.param(c, e, p, id=i) for i, c, e, p in API_CASES])
def test_api_bad_input_names_the_field(call, exc, pattern, tmp_path):
    with pytest.raises(exc, match=pattern):
        call(tmp_path)


def test_matching_dtypes_and_autocast_pass_the_dtype_check():
    """The dtype check is no stricter than the layers: float64 model + float64 input, and autocast (mixed
    precision feeds bfloat16 activations to float32 layers), both run."""
    x = torch.randn(1, 4, 32)
    mixer = _mixer("mixers", "full").double()
    assert mixer(x.double(), SeqContext.simple(1, 4))[0].dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _mixer("mixers", "full")(x.bfloat16(), SeqContext.simple(1, 4))


def test_debug_shows_the_traceback(files, monkeypatch, capsys):
    argv = [a.replace("{d}", str(files)) for a in [*FIT, "--model.dim", "-64"]]
    with pytest.raises(ValueError, match="dim must be a positive int"):
        main([*argv, "--debug"])
    monkeypatch.setenv("MMGROW_DEBUG", "1")
    with pytest.raises(ValueError, match="dim must be a positive int"):
        main(argv)


def test_bugs_keep_their_traceback_and_exit_codes_come_from_the_exception(monkeypatch, capsys):
    monkeypatch.delenv("MMGROW_DEBUG", raising=False)

    def bug(argv):
        return {}["missing"]

    with pytest.raises(KeyError):  # not a user error: the traceback is the report
        run_command(bug, [])

    class Diverged(RuntimeError):
        exit_code = 3

    def diverges(argv):
        raise Diverged("loss is nan at step 7")

    assert run_command(diverges, []) == 3
    assert capsys.readouterr().err == "mmgrow: error: loss is nan at step 7\n"

    def torch_error(argv):
        torch.zeros(2).view(3)  # raised inside torch: a RuntimeError, never reported as bad input

    with pytest.raises(RuntimeError):
        run_command(torch_error, [])

    def wrapped(argv):
        try:
            mmgrow.create("mixers", "full", dim=-1)
        except ValueError as exc:
            raise RuntimeError("setup failed") from exc

    assert run_command(wrapped, []) == 2
    assert "dim must be a positive int, got -1" in capsys.readouterr().err


def test_a_closed_pipe_is_not_an_error(capsys, monkeypatch):
    """``mmgrow plugins list | head``: the reader leaving early exits 0 with no error line."""
    import os

    from mmgrow.cli_errors import run_command

    redirected = []
    monkeypatch.setattr(os, "dup2", lambda fd, fd2: redirected.append(fd2))
    monkeypatch.setattr("sys.stdout", type("Out", (), {"fileno": lambda self: 1})())

    def reader_gone(argv):
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command(reader_gone, ["plugins", "list"]) == 0
    assert redirected == [1] and "error" not in capsys.readouterr().err
