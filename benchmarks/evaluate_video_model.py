"""Automatic evaluation of a trained text-to-video (or storyboard) run with the attribute probe.

For the first ``--num`` samples of the validation split (seen attribute combinations) and of the
held-out split (combinations never trained on), the run generates a video from each sample's caption
(or storyboard), then:

* **text alignment**: the fraction of generated clips in which the probe sees the asked shape, colour
  and motion (per attribute and all three);
* **Fréchet distance** (FVD-style, probe features of whole clips, torchmetrics) between the generated
  clips and the real clips of the same samples, next to the distance between two independent real
  sets of the same size (the floor a perfect generator would reach with this many clips);
* **scene consistency** (storyboard runs): whether each scene keeps its object and the object changes
  exactly at the requested transitions.

Writes ``benchmarks/results/<name>.json`` and the ``video_eval_<name>`` section of docs/benchmarks.md.

    python benchmarks/evaluate_video_model.py --checkpoint runs/t2v_dit/quick --num 48 --guidance 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def clips_of(videos: list[torch.Tensor], samples: list) -> torch.Tensor:
    """``[N, F, H, W, 3]`` clips: whole videos, or the fixed-length segments of storyboards (whose
    videos differ in length), so the Fréchet distance compares segment clips."""
    if "segment_frames" in samples[0].meta:
        k = samples[0].meta["segment_frames"]
        return torch.cat([torch.stack(v.split(k)) for v in videos])
    return torch.stack(videos)


def evaluate(run: Path, num: int, guidances: list[float], steps: int, solver: str, probe_path: str, seed: int) -> dict:
    from mmgrow.evaluation.probe import load_probe
    from mmgrow.evaluation.video_metrics import frechet_distance, scene_consistency, text_alignment
    from mmgrow.training.generate_cli import load_run
    from mmgrow.training.generation import SamplerSettings
    from mmgrow.training.samples import generate_video

    model, objective, dm = load_run(run)
    probe = load_probe(probe_path)
    task = next(t for t in dm.tasks if "video" in t.target_modalities)
    dataset_cls, args = type(dm.val_set), dict(dm.hparams.dataset_args or {})
    splits = {"val": dataset_cls(num_samples=num, seed=dm.seed, split="val", **args),
              "heldout": dataset_cls(num_samples=num, seed=dm.seed, split="heldout", **args)}
    results: dict = {"checkpoint": str(run), "num": num, "steps": steps, "solver": solver, "rows": []}
    for split, data in splits.items():
        real = [data[i] for i in range(num)]
        reference = dataset_cls(num_samples=num, seed=dm.seed + 1000, split=split, **args)  # independent real clips
        real_clips = clips_of([s.media["video"] for s in real], real)
        floor = frechet_distance(real_clips, clips_of([reference[i].media["video"] for i in range(num)],
                                                      [reference[i] for i in range(num)]), probe)
        for g in guidances:
            settings = SamplerSettings(steps=steps, solver=solver, guidance=g, seed=seed)
            start = time.perf_counter()
            fake = [generate_video(model, objective, dm.builder, task, s, "video", dm.condition_encoder, settings)
                    for s in real]
            seconds = time.perf_counter() - start
            fake_clips = clips_of(fake, real)
            row = {"split": split, "guidance": g, "seconds": seconds,
                   "frechet_distance": frechet_distance(real_clips, fake_clips, probe), "frechet_real_floor": floor}
            if "scenes" in real[0].meta:
                scores = [scene_consistency(v, s.meta["scenes"], s.meta["segment_frames"], probe)
                          for v, s in zip(fake, real)]
                for key in ("within_scene", "transitions", "alignment", "score"):
                    values = [sc[key] for sc in scores if sc[key] is not None]
                    row[key] = sum(values) / len(values) if values else None
            else:
                row.update({f"align_{k}": v for k, v in text_alignment(torch.stack(fake), [s.meta for s in real],
                                                                          probe).items()})
            results["rows"].append(row)
            print(json.dumps(row))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num", type=int, default=48)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--solver", default="euler")
    p.add_argument("--probe", default=str(ROOT / "pretrained" / "shapes_probe"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run = Path(a.checkpoint)
    res = evaluate(run, a.num, a.guidance, a.steps, a.solver, a.probe, a.seed)
    name = run.name
    out = ROOT / "benchmarks" / "results" / f"video_eval_{name}.json"
    out.write_text(json.dumps(res, indent=2))

    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _report import update_benchmarks_md

    story = any("score" in r for r in res["rows"])
    keys = ["within_scene", "transitions", "alignment", "score"] if story else \
        ["align_shape", "align_colour", "align_motion", "align_all"]
    rows = [[r["split"], f"{r['guidance']:g}", *[("—" if r.get(k) is None else f"{r[k]:.3f}") for k in keys],
             f"{r['frechet_distance']:.1f}", f"{r['frechet_real_floor']:.1f}", f"{r['seconds']:.1f}"] for r in res["rows"]]
    cmd = (f"python benchmarks/evaluate_video_model.py --checkpoint {a.checkpoint} --num {a.num} "
           f"--guidance {' '.join(f'{g:g}' for g in a.guidance)} --steps {a.steps} --solver {a.solver}")
    update_benchmarks_md(f"video_eval_{name}", f"Automatic video evaluation: `{a.checkpoint}`", cmd,
                         f"CPU ({a.threads} threads)", ["split", "guidance", *keys, "Fréchet (probe)",
                                                        "Fréchet real vs real", "generation s"], rows,
                         note=("Probe-based stand-ins for human and CLIP/FVD evaluations; see docs/diffusion.md "
                               "for what they mean and do not mean. `val` = attribute combinations seen in "
                               "training, `heldout` = combinations never trained on."))


if __name__ == "__main__":
    main()
