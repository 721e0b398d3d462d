"""Fixture run directories with known numbers for the ``mmgrow report`` tests (built in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 2 ** 20


def write_run(run: Path, *, summary: dict | None = None, csv_rows: list[dict] | None = None,
              ablation: dict | None = None, heldout: dict | None = None, config: str = "seed_everything: 0\n",
              summary_text: str | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if summary_text is not None:
        (run / "summary.json").write_text(summary_text)
    if csv_rows is not None:
        columns = ["epoch", "step"] + sorted({k for r in csv_rows for k in r} - {"epoch", "step"})
        lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in csv_rows]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    if ablation is not None:
        (run / "ablation_run.json").write_text(json.dumps(ablation))
    if heldout is not None:
        (run / "samples").mkdir(exist_ok=True)
        (run / "samples" / "heldout.json").write_text(json.dumps(heldout))
    return run


def summary(val: float, train: float, tps: float, mem_mib: float, status: str = "complete", *,
            tokens: int = 40, steps: int = 2, wall: float = 8.0, bits: float | None = None) -> dict:
    metrics = {"train/loss": train, "val/loss": val}
    if bits is not None:
        metrics["val/bits_per_token"] = bits
    return {"status": status, "final_train_loss": train, "final_val_loss": val, "metrics": metrics,
            "parameters": 1100, "non_embedding_parameters": 1000, "embedding_parameters": 100, "tokens_seen": tokens,
            "tokens_per_s": tps, "wall_seconds": wall, "global_step": steps, "peak_memory_bytes": int(mem_mib * MIB),
            "state_size_per_example": 64, "flops_per_token": 6000.0, "device": "cpu", "tasks": None}


def heldout(alignment: float, consistency: float) -> dict:
    return {"samples": [], "match_rate": {"colour": alignment},
            "probe": {"text_alignment": {"all": alignment}, "scene_consistency": {"score": consistency}}}


def ablation_tree(root: Path) -> Path:
    """Two variants x two seeds plus one diverged run:

    ttt   seed 0: val 1.0, train 0.9, 100 tok/s, 100 MiB, align 0.5, bits 1.5, CSV with perf/tokens_seen
    ttt   seed 1: val 1.2, train 1.1, 300 tok/s, 200 MiB, align 1.0, bits 1.7
    mamba seed 0: val 2.0, train 1.9, 50 tok/s, 300 MiB, align 0.25 (CSV without perf columns: fallback x)
    mamba seed 1: val 2.0, train 1.5, 70 tok/s, 300 MiB, align 0.75
    mamba seed 2: diverged (val 9.0): listed, not averaged
    """
    for seed, (val, train, tps, mem, align, bits, losses) in enumerate(
            [(1.0, 0.9, 100, 100, 0.5, 1.5, (3.0, 2.0)), (1.2, 1.1, 300, 200, 1.0, 1.7, (5.0, 4.0))]):
        # Lightning's CSV step counts from 0: rows after optimizer steps 1 and 2 have step 0 and 1
        rows = [{"epoch": 0, "step": 0, "train/loss": losses[0], "perf/tokens_seen": 10},
                {"epoch": 0, "step": 1, "train/loss": losses[1], "perf/tokens_seen": 20},
                {"epoch": 0, "step": 1, "val/loss": val}]
        write_run(root / f"ttt-s{seed}", summary=summary(val, train, tps, mem, bits=bits), csv_rows=rows,
                  ablation={"variant": "ttt", "seed": seed, "overrides": {}, "ablation": "mixers"},
                  heldout=heldout(align, 0.5))
    for seed, (val, train, tps, align, status) in enumerate(
            [(2.0, 1.9, 50, 0.25, "complete"), (2.0, 1.5, 70, 0.75, "complete"), (9.0, 9.0, 60, 0.0, "diverged")]):
        rows = [{"epoch": 0, "step": 0, "train/loss": train + 1.0}, {"epoch": 0, "step": 1, "train/loss": train},
                {"epoch": 0, "step": 1, "val/loss": val}]
        write_run(root / f"mamba-s{seed}", summary=summary(val, train, tps, 300, status), csv_rows=rows,
                  ablation={"variant": "mamba", "seed": seed, "overrides": {}, "ablation": "mixers"},
                  heldout=heldout(align, 1.0))
    return root
