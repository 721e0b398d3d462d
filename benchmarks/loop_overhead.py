"""Loop overhead: tokens/s of `mmgrow fit` against a bare PyTorch loop on the same model and batches.

Both loops train the same `UnifiedModel` (same seed, same config) on the same DataLoader of the
quickstart data for ``--steps`` optimizer steps with AdamW and gradient clipping. Time runs from the
end of the first step to the end of the last (data loading included, warm-up step excluded). The
`mmgrow fit` side is the real CLI (LightningCLI, loggers, checkpointing, rich progress bar) with
validation and sample generation switched off, so the difference is the loop's own overhead.
Each side runs ``--repeats`` times, alternating; the script reports medians and their ratio.

    python benchmarks/loop_overhead.py [--steps 30] [--repeats 3] [--out benchmarks/results/loop_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import update_benchmarks_md

MODEL = {"dim": 128, "depth": 4}
# The quickstart's data (recipes/quickstart.yaml).
DATA = {"tasks": ["text_to_video"], "codecs": {"text": "bytes", "video": "pixels"}, "codec_args": {"video": {"grid": 6}},
        "dataset": "shapes", "dataset_args": {"frames": 4, "size": 24, "grid": 6, "random_start": False},
        "num_train": 4096, "num_val": 8, "batch_size": 32, "seed": 0}


def bare_loop(steps: int) -> float:
    """Plain PyTorch: the same model, objective, optimizer and DataLoader; returns tokens/s."""
    from mmgrow.data.datamodule import MMDataModule
    from mmgrow.training.module import MMGrowModule

    torch.manual_seed(0)
    dm = MMDataModule(**DATA)
    module = MMGrowModule(vocab=dm.vocab, **MODEL)  # reuse its model building and optimizer settings
    module.configure_model()
    model, objective = module.model, module.objective
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    tokens, start = 0, None
    for step, batch in enumerate(dm.train_dataloader()):
        if step >= steps:
            break
        out = model(batch.input_ids, objective.context(batch))
        loss, _ = objective.loss(out, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if start is None:
            start = time.perf_counter()
        else:
            tokens += batch.num_tokens
    return tokens / (time.perf_counter() - start)


def fit_loop(steps: int) -> float:
    """`mmgrow fit` through the real CLI; tokens/s from the run's summary.json (same timing rule)."""
    from mmgrow.training.cli import build_cli

    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "--seed_everything", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                "--trainer.gradient_clip_val", "1.0", "--trainer.default_root_dir", tmp,
                "--trainer.num_sanity_val_steps", "0",
                "--model.lr", "1e-3", "--model.warmup_steps", "0"]
        args += [f"--model.{k}={v}" for k, v in MODEL.items()]
        args += [f"--data.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in DATA.items()]
        args += ["--trainer.callbacks+=mmgrow.training.samples.GenerateSamples",
                 "--trainer.callbacks.num_samples=0"]
        build_cli(args)
        return json.loads((Path(tmp) / "summary.json").read_text())["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loop_overhead.json"))
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    bare, fit = [], []
    for r in range(args.repeats):
        bare.append(bare_loop(args.steps))
        fit.append(fit_loop(args.steps))
        print(f"repeat {r}: bare {bare[-1]:.0f} tok/s, mmgrow fit {fit[-1]:.0f} tok/s", flush=True)
    result = {
        "benchmark": "loop_overhead",
        "command": f"python benchmarks/loop_overhead.py --steps {args.steps} --repeats {args.repeats}",
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": MODEL, "data": DATA, "steps": args.steps,
        "bare_tokens_per_s": bare, "fit_tokens_per_s": fit,
        "bare_median": statistics.median(bare), "fit_median": statistics.median(fit),
        "ratio_fit_over_bare": statistics.median(fit) / statistics.median(bare),
        "goal": ">= 0.9",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("bare_median", "fit_median", "ratio_fit_over_bare")}, indent=2))
    if not args.no_docs:
        rows = [["bare PyTorch loop", f"{result['bare_median']:.0f}", "1.00"],
                ["`mmgrow fit`", f"{result['fit_median']:.0f}", f"{result['ratio_fit_over_bare']:.3f}"]]
        update_benchmarks_md("loop_overhead", "Loop overhead (`benchmarks/loop_overhead.py`)",
                             result["command"], result["device"], ["loop", "tokens/s (median)", "ratio"], rows,
                             note=f"{args.repeats} alternating repeats of {args.steps} steps; goal ratio >= 0.9.")


if __name__ == "__main__":
    main()
