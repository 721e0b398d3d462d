"""Train the shapes attribute probe on real generated clips and measure it on held-out ones.

Training clips come from :class:`~mmgrow.data.synthetic.shapes.ShapesDataset` (``split="train"``,
every non-background colour, random starts, a fresh clip for every example, clip lengths drawn
from ``--min-frames .. --max-frames`` per batch); half of each batch gets stray cells of random
colours (``--stray-rate`` per background cell and frame), so isolated errors of a generator do not
flip the probe's answer. Evaluation uses a different seed and the ``"val"``
split (combinations seen in training, new clips) and the ``"heldout"`` split (combinations never
trained on), for several clip lengths, clean and with stray cells. Writes the weights to
``pretrained/shapes_probe/`` and the accuracies to ``benchmarks/results/probe.json``.

    python benchmarks/train_probe.py [--steps 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmgrow.data.synthetic.shapes import ShapesDataset
from mmgrow.evaluation.probe import ALL_COLOURS, DEFAULT_PROBE_DIR, AttributeProbe
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE

TRAIN_SEED = 0
EVAL_SEED = 12345
EVAL_FRAMES = (2, 4, 6)


def clips_and_labels(ds: ShapesDataset, indices: range, probe: AttributeProbe) -> tuple[torch.Tensor, dict]:
    """``uint8 [N, F, H, W, 3]`` clips and ``{attribute: int64 [N]}`` class indices of ``ds[indices]``."""
    samples = [ds[i] for i in indices]
    labels = {name: torch.tensor([names.index(s.meta[name]) for s in samples])
              for name, names in probe.labels.items()}
    return torch.stack([s.media["video"] for s in samples]), labels


def add_stray_cells(clips: torch.Tensor, rate: float, generator: torch.Generator, grid: int = 8) -> torch.Tensor:
    """Paint each background cell of each frame with a random non-background palette colour with
    probability ``rate``: the isolated wrong cells a generator makes, which must not change the answer."""
    px = clips.shape[2] // grid
    cells = clips[:, :, ::px, ::px]  # [N, F, g, g, 3]: shapes videos are constant per cell
    palette = torch.tensor([DEFAULT_PALETTE[c] for c in ALL_COLOURS], dtype=torch.uint8)
    hit = (torch.rand(cells.shape[:-1], generator=generator) < rate) & (cells == 0).all(-1)
    colour = palette[torch.randint(len(palette), cells.shape[:-1], generator=generator)]
    cells = torch.where(hit[..., None], colour, cells)
    return cells.repeat_interleave(px, dim=2).repeat_interleave(px, dim=3)


def accuracy(probe: AttributeProbe, split: str, frames: int, n: int, stray_rate: float = 0.0) -> dict[str, float]:
    ds = ShapesDataset(num_samples=n, frames=frames, colours=ALL_COLOURS, seed=EVAL_SEED, split=split)
    clips, labels = clips_and_labels(ds, range(n), probe)
    if stray_rate:
        clips = add_stray_cells(clips, stray_rate, torch.Generator().manual_seed(EVAL_SEED))
    with torch.no_grad():
        logits = probe.eval()(clips)
    correct = {k: logits[k].argmax(-1) == labels[k] for k in labels}
    out = {k: float(v.float().mean()) for k, v in correct.items()}
    out["all"] = float(torch.stack(list(correct.values())).all(0).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-frames", type=int, default=2)
    ap.add_argument("--max-frames", type=int, default=6, help="6 is the longest clip a 3-cell shape fits in 8 cells")
    ap.add_argument("--stray-rate", type=float, default=0.02,
                    help="per-cell probability of a stray coloured cell in half of the training clips")
    ap.add_argument("--eval-clips", type=int, default=600, help="clips per (split, length) in the evaluation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(DEFAULT_PROBE_DIR))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(TRAIN_SEED)
    rng = random.Random(TRAIN_SEED)
    generator = torch.Generator().manual_seed(TRAIN_SEED)

    probe = AttributeProbe()
    train_sets = {f: ShapesDataset(num_samples=2**40, frames=f, colours=ALL_COLOURS, seed=TRAIN_SEED, split="train")
                  for f in range(args.min_frames, args.max_frames + 1)}
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    start, next_index, losses = time.perf_counter(), 0, []
    probe.train()
    for step in range(args.steps):
        frames = rng.randint(args.min_frames, args.max_frames)
        # A never-used index range per batch: every training clip is a fresh draw.
        clips, labels = clips_and_labels(train_sets[frames], range(next_index, next_index + args.batch), probe)
        next_index += args.batch
        noisy = clips[: args.batch // 2]
        clips = torch.cat([add_stray_cells(noisy, args.stray_rate, generator), clips[args.batch // 2:]])
        logits = probe(clips)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}", flush=True)
    train_seconds = time.perf_counter() - start

    probe.eval()
    results = {split: {str(f): accuracy(probe, split, f, args.eval_clips) for f in EVAL_FRAMES}
               for split in ("val", "heldout")}
    results["heldout_stray_cells"] = {str(f): accuracy(probe, "heldout", f, args.eval_clips, args.stray_rate)
                                      for f in EVAL_FRAMES}
    for split, per_len in results.items():
        for f, acc in per_len.items():
            print(f"{split:8s} F={f}: " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    probe.save(args.out_dir)
    record = {
        "command": " ".join(["python benchmarks/train_probe.py", *sys.argv[1:]]),
        "device": f"cpu ({platform.processor() or platform.machine()}), torch threads {args.threads}",
        "torch": torch.__version__,
        "steps": args.steps, "batch": args.batch, "train_clips": next_index, "train_seconds": round(train_seconds, 1),
        "train_frames": [args.min_frames, args.max_frames], "train_seed": TRAIN_SEED, "train_split": "train",
        "eval_seed": EVAL_SEED, "eval_clips_per_setting": args.eval_clips, "final_train_loss": losses[-1],
        "num_parameters": sum(p.numel() for p in probe.parameters()), "config": probe.config(),
        "accuracy": results,
        "min_accuracy": min(v for per_len in results.values() for acc in per_len.values() for v in acc.values()),
        "weights": str(Path(args.out_dir).resolve().relative_to(ROOT)) if Path(args.out_dir).resolve().is_relative_to(
            ROOT) else args.out_dir,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out_dir} and {args.results}")


if __name__ == "__main__":
    main()
