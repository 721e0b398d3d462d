"""UnIVAL at small scale: curriculum + task balancing vs a flat mixture, transfer to audio, weight interpolation.

Three measurements of docs/unival.md, from the shipped recipes (``recipes/unival/multitask_cpu.yaml`` and
``finetune_audio_cpu.yaml``: their ``model`` and ``data`` sections; the step counts, width and batch size
come from the flags so the same script serves a CPU and a GPU):

``balance``: the recipe (UnIVAL's every-cnt_k task balancing and the two-stage curriculum: image-text,
then + video-text) vs a *flat* mixture of the same sources (every source a main source of weight 1, no
extras, no curriculum) at equal compute (same steps, batch size and model). Per-task metrics on the val
split and on held-out attribute combinations.

``transfer``: audio captioning + audio QA fine-tuned for ``--finetune-steps`` from the ``balance``
recipe model vs from scratch (same steps): the paper's claim that multitask pre-training on other
modalities transfers to an unseen one.

``interpolation``: two fine-tunes of the pre-trained model, one on image QA, one on grounding (same
steps each), and their weight interpolations ``(1 - lam) * A + lam * B`` for ``lam`` in ``--lambdas``:
both tasks' metrics on seen (val) and held-out combinations along ``lam`` (UnIVAL: interpolating
fine-tunes helps out-of-distribution generalisation).

    python benchmarks/unival_experiments.py [--steps 600] [--finetune-steps 300] [--device cpu]

Writes benchmarks/results/unival.json (``--out``) and prints the Markdown tables of docs/unival.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _data_runs import device_name, fit

MULTITASK = ROOT / "recipes" / "unival" / "multitask_cpu.yaml"
FINETUNE = ROOT / "recipes" / "unival" / "finetune_audio_cpu.yaml"


def recipe(path: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(data, model)`` sections of a recipe as the data module / module take them, scaled by the flags."""
    import mmgrow

    cfg = yaml.safe_load(path.read_text())
    data, model = copy.deepcopy(cfg["data"]), copy.deepcopy(cfg["model"])
    objective = model.pop("objective", None) or {"class_path": "autoregressive"}
    model["objective"] = mmgrow.create("objectives", objective["class_path"], **(objective.get("init_args") or {}))
    model.pop("init_from", None)
    model.update(dim=args.dim, depth=args.depth)
    data.update(batch_size=args.batch, num_val=args.samples, num_workers=args.workers)
    return data, model


def flat(data: dict[str, Any]) -> dict[str, Any]:
    """The same sources, every one a main source of weight 1; no extras, no curriculum."""
    out = copy.deepcopy(data)
    out["sources"] = [{k: v for k, v in s.items() if k != "every"} | {"weight": 1.0} for s in data["sources"]]
    out.pop("curriculum", None)
    return out


def scaled_curriculum(data: dict[str, Any], steps: int, recipe_steps: int) -> dict[str, Any]:
    """The recipe's stage boundaries scaled from its ``max_steps`` to ``steps``."""
    out = copy.deepcopy(data)
    for stage in out.get("curriculum") or []:
        if "until" in stage:
            stage["until"] = {"step": max(1, round(stage["until"]["step"] * steps / recipe_steps))}
    return out


def scores(module: Any, dm: Any, samples: int) -> dict[str, Any]:
    from mmgrow.evaluation.tasks import evaluate_tasks

    module.model.eval()
    return {split: evaluate_tasks(module.model, module.objective, dm, split, samples) for split in ("val", "heldout")}


def train(name: str, data: dict, model: dict, steps: int, args: argparse.Namespace) -> tuple[Any, Any, dict]:
    dm, module, seconds = fit(data, model, steps, args.device)
    module.model.to(args.device)
    start = time.perf_counter()
    result = {"steps": steps, "train_seconds": seconds, "tasks": scores(module, dm, args.samples)}
    result["eval_seconds"] = time.perf_counter() - start
    print(name, json.dumps(result["tasks"]), f"{seconds:.0f} s", flush=True)
    return dm, module, result


def save(module: Any, directory: Path) -> str:
    from mmgrow.rundir import save_model

    save_model(module.model, module.model_config(), directory)
    return str(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="pre-training steps of both mixtures")
    ap.add_argument("--finetune-steps", type=int, default=300, help="steps of every fine-tune")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=64, help="items scored per task and split")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--only", nargs="+", choices=("balance", "transfer", "interpolation"),
                    default=["balance", "transfer", "interpolation"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers building the training batches")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "unival.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    recipe_steps = yaml.safe_load(MULTITASK.read_text())["trainer"]["max_steps"]
    data, model = recipe(MULTITASK, args)
    data = scaled_curriculum(data, args.steps, recipe_steps)
    result: dict[str, Any] = {"command": "python benchmarks/unival_experiments.py " + " ".join(sys.argv[1:]),
                              "device": device_name(args.device), "args": vars(args)}
    tmp = Path(tempfile.mkdtemp(prefix="unival-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def keep() -> None:  # after every run: a run cut short still leaves what it measured
        out.write_text(json.dumps(result, indent=2))

    _, pretrained, result["balanced_curriculum"] = train("balanced+curriculum", data, model, args.steps, args)
    base = save(pretrained, tmp / "pretrained")
    keep()
    if "balance" in args.only:
        result["flat"] = train("flat", flat(data), model, args.steps, args)[2]
        keep()

    audio_data, audio_model = recipe(FINETUNE, args)
    if "transfer" in args.only:
        result["audio_from_pretrained"] = train("audio from pre-trained", audio_data, {**audio_model, "init_from": base},
                                                args.finetune_steps, args)[2]
        result["audio_from_scratch"] = train("audio from scratch", audio_data, audio_model, args.finetune_steps,
                                             args)[2]
        keep()

    if "interpolation" in args.only:
        result["interpolation"] = interpolation(data, model, base, args)

    keep()
    print(render(result))


def interpolation(data: dict, model: dict, base: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tunes A (image_qa) and B (grounding) from ``base``; both tasks along ``lam``."""
    from mmgrow.evaluation.tasks import evaluate_tasks
    from mmgrow.merge import merge_state_dicts

    by_name = {s["name"]: s for s in data["sources"]}
    tuned = {}
    for name in ("image_qa", "grounding"):
        source = {k: v for k, v in by_name[name].items() if k != "every"}
        one = {**{k: v for k, v in data.items() if k != "curriculum"}, "sources": [source]}
        dm, module, tuned[name] = train(f"fine-tune {name}", one, {**model, "init_from": base}, args.finetune_steps,
                                        args)
        tuned[name]["state"] = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
    both = {**{k: v for k, v in data.items() if k != "curriculum"},
            "sources": [{k: v for k, v in by_name[n].items() if k != "every"} for n in ("image_qa", "grounding")]}
    from mmgrow.data.datamodule import MMDataModule

    dm = MMDataModule(**both)
    net = module.model
    curve = []
    for lam in args.lambdas:
        merged = merge_state_dicts([tuned["image_qa"]["state"], tuned["grounding"]["state"]], [1.0 - lam, lam])
        net.load_state_dict(merged)
        net.eval()
        curve.append({"lambda": lam, **{split: evaluate_tasks(net, module.objective, dm, split, args.samples)
                                        for split in ("val", "heldout")}})
        print("lambda", lam, json.dumps(curve[-1]), flush=True)
    return {"curve": curve, "fine_tunes": {k: {kk: vv for kk, vv in v.items() if kk != "state"}
                                           for k, v in tuned.items()}}


def _cell(result: dict, split: str, source: str) -> str:
    from mmgrow.evaluation.tasks import main_metric

    r = result["tasks"][split].get(source)
    if r is None:
        return "-"
    extra = {k: v for k, v in r.items() if k not in ("task", "samples", "accuracy")}
    _, value = main_metric(r)
    tail = "".join(f" ({k} {v:.2f})" for k, v in extra.items())
    return f"{value:.2f}{tail}"


def render(result: dict) -> str:
    """The Markdown tables of docs/unival.md."""
    from _report import markdown_table

    parts = [f"Device: {result['device']}. Command: `{result['command']}`.", ""]
    def side_by_side(runs: dict) -> list[str]:  # one row per task and split, one column per run
        sources = list(next(iter(runs.values()))["tasks"]["val"])
        rows = [[src, split, *[_cell(r, split, src) for r in runs.values()]]
                for split in ("val", "heldout") for src in sources]
        return [markdown_table(["task", "split", *runs], rows), ""]

    if "flat" in result:
        parts += side_by_side({"balanced + curriculum": result["balanced_curriculum"], "flat mixture": result["flat"]})
    if "audio_from_scratch" in result:
        parts += side_by_side({"from multitask model": result["audio_from_pretrained"],
                               "from scratch": result["audio_from_scratch"]})
    if "interpolation" in result:
        from mmgrow.evaluation.tasks import main_metric

        rows = []
        for point in result["interpolation"]["curve"]:
            cells = []
            for split in ("val", "heldout"):
                for src in ("image_qa", "grounding"):
                    r = point[split][src]
                    cells.append(f"{main_metric(r)[1]:.2f}" + (f" (IoU {r['iou']:.2f})" if "iou" in r else ""))
            rows.append([f"{point['lambda']:.2f}", *cells])
        parts += [markdown_table(["lambda (0 = image_qa tune, 1 = grounding tune)", "image_qa val", "grounding val",
                                  "image_qa held-out", "grounding held-out"], rows), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
