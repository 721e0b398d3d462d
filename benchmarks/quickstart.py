"""Quickstart quality and cost: train `recipes/quickstart.yaml` and score its held-out samples.

Runs `mmgrow fit --config recipes/quickstart.yaml` (the command behind `make demo`) ``--repeats``
times with different seeds for sampling, in a subprocess each (so the wall time includes start-up,
as a user sees it), and reports per run: wall seconds, training tokens/s, final train/val loss, and
the fraction of held-out captions whose generated video shows the asked colour, shape and motion
(`samples/heldout.json`, read back with `describe_video`). Medians go to JSON and docs/benchmarks.md.

    python benchmarks/quickstart.py [--repeats 1] [--out benchmarks/results/quickstart.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import update_benchmarks_md


def one_run(run_dir: Path, samples: int) -> dict:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "mmgrow", "fit", "--config", "recipes/quickstart.yaml",
           "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
           "--trainer.callbacks+=mmgrow.training.samples.GenerateSamples",
           f"--trainer.callbacks.num_samples={samples}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    scores = json.loads((run_dir / "samples" / "heldout.json").read_text())
    return {"wall_seconds_total": wall, "fit_wall_seconds": summary["wall_seconds"],
            "tokens_per_s": summary["tokens_per_s"], "final_train_loss": summary["final_train_loss"],
            "final_val_loss": summary["final_val_loss"], "heldout_match_rate": scores["match_rate"],
            "heldout_samples": len(scores["samples"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--samples", type=int, default=6, help="held-out captions to generate (the dataset has 6)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart.json"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    import torch

    runs = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_run(Path(tmp), args.samples))
        print(f"run {r}: {json.dumps(runs[-1])}", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_seconds_total", "fit_wall_seconds",
                                                             "tokens_per_s", "final_val_loss")}
    rates = {k: statistics.median(r["heldout_match_rate"][k] for r in runs) for k in runs[0]["heldout_match_rate"]}
    command = f"python benchmarks/quickstart.py --repeats {args.repeats} --samples {args.samples}"
    device = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}"
    result = {"benchmark": "quickstart", "command": command, "device": device, "runs": runs, "median": med,
              "median_heldout_match_rate": rates}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"median": med, "heldout": rates}, indent=2))
    if not args.no_docs:
        rows = [["wall time of `mmgrow fit` (s, incl. start-up and sampling)", f"{med['wall_seconds_total']:.0f}"],
                ["fit time (s)", f"{med['fit_wall_seconds']:.0f}"],
                ["training tokens/s", f"{med['tokens_per_s']:.0f}"],
                ["final val loss", f"{med['final_val_loss']:.4f}"]]
        rows += [[f"held-out samples showing the asked {k}", f"{v:.2f}"] for k, v in sorted(rates.items())]
        update_benchmarks_md("quickstart", "Quickstart (`benchmarks/quickstart.py`)", command, device,
                             ["quantity", "median"], rows,
                             note=f"{args.repeats} run(s); {args.samples} held-out captions each, sampled at "
                                  "temperature 1 with seed 0; scores read back with `describe_video`.")


if __name__ == "__main__":
    main()
