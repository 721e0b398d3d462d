"""Needle retrieval vs context length: LWM's progressive context extension against short-only training.

Two models of the same size train the same number of steps on text needle retrieval (a filler
haystack with "the code is NN." at a random depth, "what is the code?" at the end; masked packing):

* ``progressive``: rows of 512 tokens with RoPE theta 1e4, then 2048 with 1e5, then 8192 with 1e6
  (the data module's curriculum switches length, batch size and needle size; the Curriculum callback
  sets theta), as ``recipes/lwm/progressive_cpu.yaml`` does;
* ``short``: 512-token rows with theta 1e4 for the whole run.

Both are then scored with ``mmgrow.evaluation.needle.evaluate_needle`` (greedy answer, exact match) on
prompts of ``--lengths`` tokens with the needle at ``--depths``; the grids go to JSON and heat maps.

    python benchmarks/needle_context.py [--stages 600 150 60] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _data_runs import device_name, fit
from _report import update_benchmarks_md


def needle(name: str, chars: int, n: int) -> dict:
    return {"name": name, "dataset": "needle", "dataset_args": {"kind": "text", "length": chars}, "task": "needle_text",
            "num_train": n, "num_val": 8}


def sources(chars: list[int]) -> list[dict]:
    """One needle source per stage: haystacks of ``chars`` characters (~ tokens with the byte codec)."""
    return [needle("needle_512", chars[0], 65536), needle("needle_2k", chars[1], 16384),
            needle("needle_8k", chars[2], 4096)]


def curricula(s1: int, s2: int, s3: int, batch: int = 16) -> dict[str, list[dict]]:
    return {
        "progressive": [
            {"name": "512", "until": {"step": s1}, "length": 512, "batch_size": batch, "rope_theta": 1.0e4,
             "mixture": {"needle_512": 1, "needle_2k": 0, "needle_8k": 0}},
            {"name": "2k", "until": {"step": s1 + s2}, "length": 2048, "batch_size": 4, "rope_theta": 1.0e5,
             "mixture": {"needle_512": 0.25, "needle_2k": 1, "needle_8k": 0}},
            {"name": "8k", "length": 8192, "batch_size": 1, "rope_theta": 1.0e6, "lr_scale": 0.5,
             "mixture": {"needle_512": 0.25, "needle_2k": 0.5, "needle_8k": 1}}],
        "short": [{"name": "512", "length": 512, "batch_size": batch, "rope_theta": 1.0e4,
                   "mixture": {"needle_512": 1, "needle_2k": 0, "needle_8k": 0}}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stages", type=int, nargs=3, default=[600, 150, 60], metavar=("S512", "S2K", "S8K"))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--block", type=int, default=512, help="blockwise attention tile (queries = keys)")
    ap.add_argument("--chars", type=int, nargs=3, default=[440, 1900, 7900], help="haystack characters per stage")
    ap.add_argument("--batch", type=int, default=16, help="examples per step in the 512-token stage")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--only", choices=["progressive", "short"], default=None, help="train one of the two")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "needle_context.json"))
    ap.add_argument("--png-dir", default=str(ROOT / "docs"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--render", default=None, help="only write the docs section and heat maps from this JSON")
    args = ap.parse_args()
    if args.render:
        render(json.loads(Path(args.render).read_text()), args.png_dir)
        return
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    from mmgrow.evaluation.needle import evaluate_needle

    model = {"dim": args.dim, "depth": args.depth, "lr": args.lr, "warmup_steps": 30,
             "mixer": {"class_path": "mmgrow.layers.blockwise.BlockwiseAttention",
                       "init_args": {"num_heads": 4, "query_block": args.block, "key_block": args.block}}}
    steps = sum(args.stages)
    result = {"benchmark": "needle_context", "command": " ".join(["python benchmarks/needle_context.py", *sys.argv[1:]]),
              "device": device_name(args.device), "stages": args.stages, "model": model, "runs": {},
              "samples": args.samples, "depths": args.depths, "lengths": args.lengths}
    for name, stages in curricula(*args.stages, batch=args.batch).items():
        if args.only not in (None, name):
            continue
        data = {"codecs": {"text": "bytes"}, "sources": sources(args.chars), "packing": {"length": 512},
                "batch_size": args.batch,
                "seed": 0, "curriculum": stages}
        dm, module, seconds = fit(data, _factory(model), steps, args.device)
        net = module.model.eval()
        with torch.no_grad():
            grid = evaluate_needle(net, module.objective, dm.builder, lengths=args.lengths, depths=args.depths,
                                   samples=args.samples, kind="text", seed=7)
        grid["train_seconds"] = seconds
        grid["final_rope_theta"] = stages[-1]["rope_theta"]
        result["runs"][name] = grid
        print(name, json.dumps(grid["accuracy"]), f"{seconds:.0f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if not args.no_docs:
        render(result, args.png_dir)


def render(result: dict, png_dir: str) -> None:
    """Heat maps (``data_needle_<run>.png`` in ``png_dir``) and the docs/benchmarks.md section."""
    from mmgrow.evaluation.needle import plot_needle_heatmap

    for name, grid in result["runs"].items():
        plot_needle_heatmap(grid, Path(png_dir) / f"data_needle_{name}.png")
    rows = [[name, *[f"{sum(row) / len(row):.2f}" for row in run["accuracy"]]] for name, run in result["runs"].items()]
    update_benchmarks_md("needle_context", "Needle retrieval vs context length (`benchmarks/needle_context.py`)",
                         result["command"], result["device"], ["training", *[f"{n} tok" for n in result["lengths"]]],
                         rows, note=f"Mean accuracy over depths {result['depths']}, {result['samples']} needles per "
                                    f"cell; {sum(result['stages'])} steps each (progressive stages {result['stages']}). "
                                    "Heat maps: [progressive](data_needle_progressive.png), "
                                    "[short](data_needle_short.png).")


def _factory(model: dict) -> dict:
    """The mixer dict as the module takes it outside the CLI: a factory (class + init args)."""
    import functools

    from mmgrow.layers.blockwise import BlockwiseAttention

    spec = dict(model)
    spec["mixer"] = functools.partial(BlockwiseAttention, **spec.pop("mixer")["init_args"])
    return spec


if __name__ == "__main__":
    main()
