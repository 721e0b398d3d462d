"""ModelGrow at small scale: grow a trained model vs. the alternatives, at equal total compute.

Stage 1 (``recipes/modelgrow/stage1.yaml``) trains a 2-block model on squares and crosses in red,
green and blue with short captions. Stage 2 continues on rings and bars in yellow, cyan and magenta
with random start cells and detailed captions, in four ways:

- ``grow``     — ``insert_depth`` (2 -> 4 blocks) + ``add_text_condition`` (MiniLM cross-attention);
- ``continue`` — the small model, no growth;
- ``stack``    — G_stack (x2) + the same text cross-attention;
- ``scratch``  — the grown architecture from random initialisation, stage-2 data only.

Compute is ``6 N T`` with ``N`` the non-embedding parameters that act on sequence tokens (the text
cross-attention's key/value projections act on the ~60 caption tokens only and are left out, as is
the frozen encoder) and ``T`` the non-padding training tokens. ``grow`` trains ``--stage2-steps``
steps; the others get the number of steps that spends the same total compute (stage 1 + stage 2;
``scratch`` gets stage 1's share on stage-2 data).

Reported per variant: stage-2 validation loss, stage-1 validation loss after stage 2 (forgetting =
its rise over the stage-1 model's), text alignment (videos generated for stage-2 validation captions,
read back exactly by the dataset's ``describe``: share of shape / colour / motion that match), the
loss jump at growth, compute and wall time. Writes ``benchmarks/results/modelgrow_experiment_s2-<N>.json``
(``N`` = stage-2 steps of ``grow``), ``docs/growth_experiment_s2-<N>.png`` and that budget's results
section of ``docs/growth.md``.

    python benchmarks/modelgrow_experiment.py                      # about 20 minutes on 2 idle CPU cores
    python benchmarks/modelgrow_experiment.py --stage2-steps 100   # a short stage 2, about 7 minutes
    python benchmarks/modelgrow_experiment.py --from-json benchmarks/results/modelgrow_experiment_s2-400.json
    python benchmarks/modelgrow_experiment.py --stage1-steps 20 --stage2-steps 20 --no-docs   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "modelgrow"
VARIANTS = ("grow", "continue", "stack", "scratch")


def fit(recipe: str, out: Path, steps: int, *extra: str):
    from mmgrow.training.cli import build_cli

    val_every = max(1, steps // 4)
    args = ["fit", "--config", str(RECIPES / recipe), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(val_every), "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(out), *extra]
    start = time.perf_counter()
    cli = build_cli(args)
    return cli, time.perf_counter() - start


def sequence_parameters(model: torch.nn.Module) -> int:
    """Non-embedding parameters that act on sequence tokens (cross-attention K/V act on the caption)."""
    skip = {id(p) for b in model.blocks for branch in b.cross_attentions
            for m in (branch.attention.k_proj, branch.attention.v_proj, branch.attention.condition_norm)
            if m is not None for p in m.parameters()}
    return model.num_parameters(exclude_embeddings=True) - sum(p.numel() for p in model.parameters()
                                                               if id(p) in skip)


def data_module(recipe: str, encoder, num_val: int):
    from mmgrow.data.datamodule import MMDataModule

    data = dict(yaml.safe_load((RECIPES / recipe).read_text())["data"])
    data.pop("condition_encoder", None)
    data.update(num_val=num_val, num_train=num_val)
    dm = MMDataModule(**data, condition_encoder=encoder)
    dm.setup("fit")
    return dm


def validation_loss(module, dm) -> float:
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    [result] = trainer.validate(module, datamodule=dm, verbose=False)
    return float(result["val/loss"])


def text_alignment(module, dm, count: int, seed: int = 0) -> dict[str, float]:
    """Videos for ``count`` validation captions, sampled, read back: match rate per attribute."""
    from mmgrow.protocols import Segment
    from mmgrow.training.samples import GenerateSamples

    codec = dm.codecs["video"]
    frames = int(dm.val_set[0].media["video"].shape[0])
    constraint = codec.generation_constraint(frames)
    max_new = codec.num_tokens(frames) - len(codec.generation_prefix())
    hits: dict[str, list[bool]] = {}
    for i in range(count):
        sample = dm.val_set[i]
        sampler = GenerateSamples(num_samples=0, seed=seed + i)
        video = sampler.sample(module, dm, Segment("text", sample.text, "input"), max_new, constraint)
        seen = dm.val_set.describe(video)
        for key, value in sample.meta.items():
            hits.setdefault(key, []).append(seen.get(key) == value)
    rates = {k: sum(v) / len(v) for k, v in hits.items()}
    rates["mean"] = sum(rates.values()) / len(rates)
    return rates


def loss_curve(run: Path, tokens_before: float, n_before: float, n_after: float) -> dict[str, list[float]]:
    """Training loss against cumulative compute (TFLOP) for the plot."""
    from mmgrow.evaluation.plots import read_metrics

    series = read_metrics(run / "metrics.csv", ["train/loss", "val/loss"])
    summary = json.loads((run / "summary.json").read_text())
    per_step = summary["tokens_seen"] / max(1, summary["global_step"])
    out = {}
    for key, (steps, values) in series.items():
        out[key] = [[(6 * n_before * tokens_before + 6 * n_after * per_step * (s + 1)) / 1e12 for s in steps], values]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1-steps", type=int, default=400)
    parser.add_argument("--stage2-steps", type=int, default=400)
    parser.add_argument("--eval-examples", type=int, default=128)
    parser.add_argument("--alignment-samples", type=int, default=24)
    parser.add_argument("--out", default=str(ROOT / "runs" / "modelgrow_experiment"))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/growth.md and the plot")
    parser.add_argument("--from-json", help="only rewrite the docs from a results file of an earlier run")
    args = parser.parse_args()
    if args.from_json:
        write_docs(json.loads(Path(args.from_json).read_text()))
        return
    out = Path(args.out)
    from mmgrow.tokenizers.text_encoder import FrozenTextEncoder

    encoder = FrozenTextEncoder(pooling="tokens", layers="mean", max_length=128)
    eval1 = data_module("stage1.yaml", encoder, args.eval_examples)
    eval2 = data_module("stage2_grow.yaml", encoder, args.eval_examples)

    s1_cli, s1_time = fit("stage1.yaml", out / "stage1", args.stage1_steps)
    s1 = json.loads((out / "stage1" / "summary.json").read_text())
    n_small = sequence_parameters(s1_cli.model.model)
    c1 = 6 * n_small * s1["tokens_seen"]
    base_stage1_loss = validation_loss(s1_cli.model, eval1)
    init = ["--model.init_from", str(out / "stage1")]

    results: dict[str, dict] = {}
    curves: dict[str, dict] = {}

    def record(name: str, cli, seconds: float, n: float, stage1_compute: float) -> None:
        run = out / name
        summary = json.loads((run / "summary.json").read_text())
        c2 = 6 * n * summary["tokens_seen"]
        module = cli.model
        results[name] = {
            "steps": summary["global_step"], "parameters": module.model.num_parameters(),
            "sequence_parameters": n, "compute_tflop": (stage1_compute + c2) / 1e12,
            "stage2_val_loss": validation_loss(module, eval2),
            "stage1_val_loss_after": validation_loss(module, eval1),
            "loss_jump": ((summary.get("growth") or {}).get("loss_jump") or {}).get("growth/loss_jump"),
            "alignment": text_alignment(module, eval2, args.alignment_samples),
            "wall_seconds": seconds,
        }
        results[name]["forgetting"] = results[name]["stage1_val_loss_after"] - base_stage1_loss
        curves[name] = loss_curve(run, s1["tokens_seen"] if stage1_compute else 0, n_small, n)

    grow_cli, t = fit("stage2_grow.yaml", out / "grow", args.stage2_steps, *init)
    n_grow = sequence_parameters(grow_cli.model.model)
    record("grow", grow_cli, t, n_grow, c1)
    budget2 = 6 * n_grow * json.loads((out / "grow" / "summary.json").read_text())["tokens_seen"]
    tokens_per_step = budget2 / (6 * n_grow * args.stage2_steps)

    cont_steps = round(budget2 / (6 * n_small * tokens_per_step))
    cli, t = fit("stage2_continue.yaml", out / "continue", cont_steps, *init)
    record("continue", cli, t, n_small, c1)

    cli, t = fit("stage2_stack.yaml", out / "stack", args.stage2_steps, *init)
    n_stack = sequence_parameters(cli.model.model)
    if n_stack != n_grow:  # same architecture size, so the same steps spend the same compute
        raise RuntimeError(f"stack and grow differ in size ({n_stack} vs {n_grow}); adjust the recipes")
    record("stack", cli, t, n_stack, c1)

    scratch_steps = round((c1 + budget2) / (6 * n_grow * tokens_per_step))
    cli, t = fit("stage2_scratch.yaml", out / "scratch", scratch_steps)
    record("scratch", cli, t, sequence_parameters(cli.model.model), 0.0)

    payload = {"device": f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}",
               "args": vars(args), "stage1": {"steps": s1["global_step"], "val_loss": base_stage1_loss,
                                               "compute_tflop": c1 / 1e12, "wall_seconds": s1_time},
               "variants": results, "curves": curves}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    name = f"modelgrow_experiment_s2-{args.stage2_steps}.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps(payload, indent=2))
    print(json.dumps({k: {m: v[m] for m in ("stage2_val_loss", "forgetting", "alignment", "compute_tflop")}
                      for k, v in results.items()}, indent=1))
    if not args.no_docs:
        write_docs(payload)


def write_docs(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import markdown_table, replace_section

    tag = f"s2-{payload['args']['stage2_steps']}"

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in VARIANTS:
        curve = payload["curves"][name]
        xs, ys = curve["train/loss"]
        ax1.plot(xs, ys, label=name, alpha=0.8)
        if "val/loss" in curve:
            ax2.plot(*curve["val/loss"], marker="o", label=name)
    for ax, title in ((ax1, "stage-2 training loss"), (ax2, "stage-2 validation loss")):
        ax.set_xlabel("total compute (TFLOP, stage 1 included)")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / f"growth_experiment_{tag}.png", dpi=110)

    rows = []
    for name in VARIANTS:
        r = payload["variants"][name]
        a = r["alignment"]
        jump = "—" if r["loss_jump"] is None else f"{r['loss_jump']:+.4f}"
        rows.append([name, str(r["steps"]), f"{r['parameters']:,}", f"{r['compute_tflop']:.2f}",
                     f"{r['stage2_val_loss']:.4f}", f"{r['stage1_val_loss_after']:.4f} ({r['forgetting']:+.4f})",
                     f"{a['shape']:.2f} / {a['colour']:.2f} / {a['motion']:.2f}", jump])
    s1 = payload["stage1"]
    a = payload["args"]
    body = "\n".join([
        f"<!-- results:modelgrow-{tag} -->",
        f"### Stage 2 of {payload['args']['stage2_steps']} steps for `grow`",
        "",
        (f"Measured on {payload['device']} with `python benchmarks/modelgrow_experiment.py "
         f"--stage1-steps {a['stage1_steps']} --stage2-steps {a['stage2_steps']}` "
        f"(stage 1: {s1['steps']} steps, {s1['compute_tflop']:.2f} TFLOP, stage-1 validation loss "
        f"{s1['val_loss']:.4f}; stage 2 for `grow`: {a['stage2_steps']} steps; evaluation on "
        f"{a['eval_examples']} validation examples per stage, alignment on {a['alignment_samples']} sampled videos)."),
        "",
        markdown_table(["variant", "stage-2 steps", "parameters", "total compute (TFLOP)", "stage-2 val loss",
                        "stage-1 val loss after (forgetting)", "alignment shape / colour / motion",
                        "loss jump at growth"], rows),
        "",
        f"![stage-2 loss against total compute](growth_experiment_{tag}.png)",
        f"<!-- /results:modelgrow-{tag} -->",
    ])
    replace_section(ROOT / "docs" / "growth.md", f"<!-- results:modelgrow-{tag} -->",
                    f"<!-- /results:modelgrow-{tag} -->", body)


if __name__ == "__main__":
    main()
