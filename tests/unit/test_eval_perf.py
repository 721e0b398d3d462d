"""Performance columns in metrics.csv (PerfLog), bits per token in a real fit, and summary.json's state size."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmgrow.training import perf_log
from mmgrow.training.cli import build_cli
from mmgrow.training.perf_log import MIB, PerfLog

ROOT = Path(__file__).resolve().parents[2]
# dim 32, mamba2 with d_state 8, headdim 16: d_inner 64 = 4 heads of 16, conv channels 64 + 2 * 8 = 80
TINY = ["--model.dim", "32", "--model.depth", "2", "--data.num_train", "48", "--data.num_val", "8",
        "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args", "{video: {grid: 4}}",
        "--data.batch_size", "4", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", "[]", "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "3",
        "--model.mixer", "{class_path: mamba2, init_args: {d_state: 8, headdim: 16}}"]


def _fit(root: Path, *extra: str):
    return build_cli(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY,
                      "--trainer.default_root_dir", str(root), *extra])


def _rows(root: Path) -> list[dict[str, float]]:
    with open(root / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def test_elapsed_excludes_validation_and_continues_after_resume(monkeypatch):
    clock = iter([10.0, 12.0, 15.0, 20.0, 30.0])  # train start, validation 12 -> 15, then two reads
    monkeypatch.setattr(perf_log.time, "perf_counter", lambda: next(clock))
    log = PerfLog()
    log.load_state_dict({"elapsed_s": 100.0})  # a resumed run had trained 100 s
    trainer = SimpleNamespace(world_size=1)
    log.on_train_start(trainer, SimpleNamespace(tokens_seen=0))
    log.on_validation_start(trainer, None)
    log.on_validation_end(trainer, None)
    assert log.elapsed() == 100.0 + (20.0 - 10.0) - (15.0 - 12.0)  # 107
    assert log.state_dict() == {"elapsed_s": 100.0 + 20.0 - 3.0}  # read at 30: 117


@pytest.fixture(scope="module")
def tiny_mamba_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf")
    _fit(root / "a", "--trainer.max_steps", "4")
    _fit(root / "b", "--trainer.max_steps", "6", "--ckpt_path", str(root / "a" / "checkpoints" / "last.ckpt"))
    return root


@pytest.mark.slow  # shares two tiny fits (~8 s together)
def test_perf_columns_follow_the_logged_training_steps(tiny_mamba_run):
    root = tiny_mamba_run / "a"
    summary = json.loads((root / "summary.json").read_text())
    rows = [r for r in _rows(root) if "train/loss" in r]
    assert len(rows) == 2  # steps 2 and 4 with log_every_n_steps = 2
    assert all({"perf/tokens_seen", "perf/elapsed_s", "perf/tokens_per_s", "perf/peak_memory_mb"} <= set(r)
               for r in rows)
    assert not any("perf/tokens_seen" in r for r in _rows(root) if "train/loss" not in r)  # validation rows
    tokens = [r["perf/tokens_seen"] for r in rows]
    elapsed = [r["perf/elapsed_s"] for r in rows]
    assert tokens[-1] == summary["tokens_seen"] and 0 < tokens[0] < tokens[1]
    assert 0 < elapsed[0] < elapsed[1] <= summary["wall_seconds"]
    # the last window's rate is its tokens over its seconds
    assert rows[1]["perf/tokens_per_s"] == pytest.approx((tokens[1] - tokens[0]) / (elapsed[1] - elapsed[0]), rel=1e-9)
    assert rows[0]["perf/tokens_per_s"] == pytest.approx(tokens[0] / elapsed[0], rel=1e-9)
    # peak memory: the summary's definition, in MiB, never falling
    assert rows[0]["perf/peak_memory_mb"] <= rows[1]["perf/peak_memory_mb"] <= summary["peak_memory_bytes"] / MIB


@pytest.mark.slow  # shares two tiny fits (~8 s together)
def test_resumed_run_continues_tokens_and_seconds(tiny_mamba_run):
    first = [r for r in _rows(tiny_mamba_run / "a") if "train/loss" in r]
    resumed = [r for r in _rows(tiny_mamba_run / "b") if "train/loss" in r]
    summary = json.loads((tiny_mamba_run / "b" / "summary.json").read_text())
    assert resumed[-1]["perf/tokens_seen"] == summary["tokens_seen"] > first[-1]["perf/tokens_seen"]
    assert resumed[-1]["perf/elapsed_s"] > first[-1]["perf/elapsed_s"]


@pytest.mark.slow  # shares two tiny fits (~8 s together)
def test_validation_logs_bits_per_token_and_summary_counts_the_state(tiny_mamba_run):
    root = tiny_mamba_run / "a"
    val = [r for r in _rows(root) if "val/loss" in r]
    assert val and all(r["val/bits_per_token"] == pytest.approx(r["val/loss"] / math.log(2), rel=1e-6) for r in val)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["metrics"]["val/bits_per_token"] == pytest.approx(summary["final_val_loss"] / math.log(2), rel=1e-6)
    # Mamba2 per layer: H * N * P SSM entries + (K - 1) * conv channels = 4 * 8 * 16 + 3 * 80 = 752; two layers
    assert summary["state_size_per_example"] == 2 * (4 * 8 * 16 + 3 * 80) == 1504


@pytest.mark.parametrize("bidirectional", [False, True])
def test_state_size_of_an_attention_model_with_a_ttt_memory(bidirectional):
    from mmgrow.models.factories import factory_from_spec
    from mmgrow.models.gated_memory import MemoryPlacement
    from mmgrow.models.unified import UnifiedModel
    from mmgrow.training.callbacks import state_size_per_example

    model = UnifiedModel(token_space={"text": 7}, dim=32, depth=2,
                         mixer=factory_from_spec({"class_path": "full", "init_args": {"num_heads": 4}}),
                         memory=factory_from_spec({"class_path": "ttt_linear", "init_args": {"num_heads": 4}}),
                         memory_placement=MemoryPlacement(bidirectional=bidirectional))
    # per block: attention K and V, 2 * 4 heads * 8 dims * 10 tokens = 640; TTT-Linear, 4 heads of 8:
    # W1 (8 x 8) + b1 (8) = 72 per head, 288 in all, twice (weights and their mini-batch accumulators) + 2 = 578
    assert state_size_per_example(model, 10) == 2 * (640 + 578) == 2436
