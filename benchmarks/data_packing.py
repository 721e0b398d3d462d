"""Masked sequence packing: throughput and padding, and LWM's packing ablation at small scale.

``throughput``: the same mixed-length data (needle-text examples of ~70, ~220 and ~920 tokens and
video-QA examples of ~430 tokens, equal weights) trained by a bare loop, one example per row padded
to the batch's longest vs masked packing into rows of ``--length`` tokens. Reports tokens/s (real,
non-padding tokens per second of forward + backward + AdamW; medians over ``--repeats`` runs), the
padding fraction and the ratio packed / padded measured in the same run.

``ablation``: LWM's Table-10 question (naive packing 48.3 -> masked packing 55.8 VQAv2) at CPU/GPU
scale. Two models train the same number of steps on the same stream of examples (shapes
text-to-video, whose ~400-token video targets dominate the tokens, and video QA, whose answers are
a few tokens): ``naive`` (concatenate and cut, no segment mask, per-token loss) vs ``masked`` (whole
examples, segment mask, restarted positions, per-example loss weights). Then greedy video-QA accuracy
on 96 validation-split videos (exact match; chance: colour 1/6, direction 1/4,
shape 1/4; "how many frames" is constant and trivial).

    python benchmarks/data_packing.py throughput [--steps 12] [--repeats 3] [--device cpu]
    python benchmarks/data_packing.py ablation [--steps 300] [--device cuda]

Writes benchmarks/results/data_packing_<mode>.json and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _data_runs import device_name, fit, step_rates
from _report import update_benchmarks_md

CODECS = {"codecs": {"text": "bytes", "video": "pixels"}, "codec_args": {"video": {"grid": 8}}}
SHAPES = {"frames": 6, "size": 32, "grid": 8}
MIXED = [
    {"name": "needle_short", "dataset": "needle", "dataset_args": {"kind": "text", "length": 48}, "task": "needle_text"},
    {"name": "needle_medium", "dataset": "needle", "dataset_args": {"kind": "text", "length": 200},
     "task": "needle_text"},
    {"name": "needle_long", "dataset": "needle", "dataset_args": {"kind": "text", "length": 900},
     "task": "needle_text"},
    {"name": "video_qa", "dataset": "shapes", "dataset_args": SHAPES, "task": "video_qa"},
]
MODEL = {"dim": 128, "depth": 4, "warmup_steps": 10}


def throughput(args) -> dict:
    data = {**CODECS, "sources": MIXED, "batch_size": 16, "num_train": 4096, "num_val": 8, "seed": 0}
    runs = {"padded": [], "packed": []}
    for r in range(args.repeats):
        runs["padded"].append(step_rates(data, MODEL, args.steps, args.device))
        runs["packed"].append(step_rates({**data, "packing": {"length": args.length}}, MODEL, args.steps, args.device))
        print(f"repeat {r}: padded {runs['padded'][-1]['tokens_per_s']:.0f} tok/s, packed "
              f"{runs['packed'][-1]['tokens_per_s']:.0f} tok/s", flush=True)
    summary = {k: {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in v),
                   "padding_fraction": statistics.median(x["padding_fraction"] for x in v),
                   "rows_per_step": statistics.median(x["rows"] / x["steps"] for x in v),
                   "row_length": statistics.median(x["slots"] / x["rows"] for x in v)}
               for k, v in runs.items()}
    summary["ratio_packed_over_padded"] = summary["packed"]["tokens_per_s"] / summary["padded"]["tokens_per_s"]
    return {"runs": runs, "summary": summary, "data": data, "model": MODEL, "length": args.length}


def ablation(args) -> dict:
    from mmgrow.data.synthetic.shapes import ShapesDataset
    from mmgrow.evaluation.qa import video_qa_accuracy

    sources = [{"name": "t2v", "dataset": "shapes", "dataset_args": SHAPES, "task": "text_to_video"},
               {"name": "video_qa", "dataset": "shapes", "dataset_args": SHAPES, "task": "video_qa"}]
    data = {**CODECS, "sources": sources, "batch_size": args.batch, "num_train": 8192, "num_val": 8, "seed": 0}
    out = {}
    for mode, packing in (("naive", {"length": args.length, "mode": "naive"}),
                          ("masked", {"length": args.length, "mode": "masked", "weighting": "example"})):
        dm, module, seconds = fit({**data, "packing": packing}, {**MODEL, "lr": args.lr}, args.steps, args.device)
        model = module.model.eval()
        heldout = ShapesDataset(num_samples=args.eval_samples, seed=1, split="val", **SHAPES)
        with torch.no_grad():
            acc = video_qa_accuracy(model, module.objective, dm.builder, heldout)
        out[mode] = {**acc, "train_seconds": seconds}
        print(f"{mode}: accuracy {acc['accuracy']:.3f} {acc['per_kind']} ({seconds:.0f} s)", flush=True)
    return {"results": out, "data": data, "model": {**MODEL, "lr": args.lr}, "steps": args.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["throughput", "ablation"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="ablation: examples per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-samples", type=int, default=96)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--render", default=None, help="only write the docs section from this result JSON")
    args = ap.parse_args()
    if args.render:
        render(json.loads(Path(args.render).read_text()))
        return
    args.steps = args.steps or (12 if args.mode == "throughput" else 300)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    result = throughput(args) if args.mode == "throughput" else ablation(args)
    command = " ".join(["python benchmarks/data_packing.py", *sys.argv[1:]])
    result.update({"benchmark": f"data_packing_{args.mode}", "command": command, "device": device_name(args.device),
                   "args": vars(args)})
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"data_packing_{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if not args.no_docs:
        render(result)


def render(result: dict) -> None:
    """The result's section of docs/benchmarks.md."""
    args = argparse.Namespace(**result["args"])
    command = result["command"]
    if args.mode == "throughput":
        s = result["summary"]
        rows = [["padded (one example per row)", f"{s['padded']['tokens_per_s']:.0f}",
                 f"{s['padded']['padding_fraction']:.3f}", "1.00"],
                [f"masked packing, rows of {args.length}", f"{s['packed']['tokens_per_s']:.0f}",
                 f"{s['packed']['padding_fraction']:.3f}", f"{s['ratio_packed_over_padded']:.2f}"]]
        tag = "cuda" if "NVIDIA" in result["device"] else "cpu"
        update_benchmarks_md(f"data_packing_throughput_{tag}", f"Packing throughput, {tag} "
                             "(`benchmarks/data_packing.py throughput`)",
                             command, result["device"], ["batches", "real tokens/s (median)", "padding fraction",
                                                         "ratio"], rows,
                             note=f"{args.repeats} alternating repeats of {args.steps} steps, 16 mixed-length examples "
                                  "per step (needle text ~70/~220/~920 tokens, video QA ~430 tokens).")
    else:
        res = result["results"]
        rows = [[mode, f"{r['accuracy']:.3f}"] + [f"{r['per_kind'].get(k, float('nan')):.2f}"
                                                 for k in ("colour", "direction", "shape", "frames")]
                for mode, r in res.items()]
        update_benchmarks_md("data_packing_ablation", "Packing ablation: naive vs masked (`benchmarks/data_packing.py "
                             "ablation`)", command, result["device"],
                             ["packing", "video-QA accuracy", "colour", "direction", "shape", "frames"], rows,
                             note=f"{args.steps} steps of {args.batch} examples (shapes text-to-video + video QA), "
                                  f"rows of {args.length} tokens; accuracy = exact greedy answers on "
                                  f"{args.eval_samples} validation videos.")


if __name__ == "__main__":
    main()
