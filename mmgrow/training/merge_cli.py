"""``mmgrow merge RUN_A RUN_B [...] [--weights w1,w2,...] --out DIR``: average the weights of runs (model soups).

The runs (run directories of ``mmgrow fit``, or model directories of ``mmgrow grow``) must share one
architecture: the same ``model.yaml`` and, with growth replayed, the same tensors. The merge is
``sum_i w_i theta_i`` per tensor, in float64, cast back (:mod:`mmgrow.merge`). Weights default to
equal; given ones must be finite, ``>= 0`` and sum to 1, or ``--normalize`` divides them by their sum.
``DIR`` receives ``model.safetensors``, ``model.yaml``, ``merge.json`` and the first run's
``config.yaml`` (its recipe), sealed by ``manifest.json``: ``mmgrow generate --checkpoint DIR`` and
``mmgrow evaluate ... --checkpoint DIR`` load it like a run. An existing non-empty ``DIR`` is refused
unless ``--force``.

``--sweep`` (exactly two runs) evaluates ``(1 - lambda) * A + lambda * B`` for ``--points`` values of
lambda evenly spaced in [0, 1], on each split of ``--splits``: the objective's loss (mean over at most
``--batches`` evaluation batches of the first run's data section) and every scored task's metrics
(at most ``--samples`` examples each) of the first run's sources and of the second run's sources with
other names (two task fine-tunes are scored on both tasks). It writes ``merge_sweep.json`` and ``merge_sweep.png`` into
``DIR`` and no weights, unless ``--weights`` is given too (then the merge with those weights is
written as well).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmgrow.cli_text import plain_text

SWEEP_RECORD = "merge_sweep.json"
SWEEP_PLOT = "merge_sweep.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgrow merge", description=plain_text(__doc__.split("\n\n")[0]))
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories of `mmgrow fit` (or model directories)")
    p.add_argument("--weights", help="comma-separated weights, one per run (default: equal); must sum to 1")
    p.add_argument("--normalize", action="store_true", help="divide the weights by their sum instead of requiring 1")
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--sweep", action="store_true",
                   help="two runs: loss and task metrics along (1 - lambda) A + lambda B (merge_sweep.json / .png)")
    p.add_argument("--points", type=int, default=11, help="sweep: values of lambda in [0, 1] (default 11)")
    p.add_argument("--splits", default="val,heldout", help="sweep: comma-separated splits (default val,heldout)")
    p.add_argument("--batches", type=int, default=8, help="sweep: evaluation batches per split for the loss (default 8)")
    p.add_argument("--samples", type=int, default=16, help="sweep: examples per scored task and split (default 16)")
    return p


def check_arguments(args: argparse.Namespace) -> tuple[list[float] | None, list[str]]:
    """Checks that need no model: ``(weights or None, sweep splits)``; bad values raise before anything loads."""
    from mmgrow.checks import int_at_least, positive_int
    from mmgrow.merge import MergeError, check_weights, parse_weights, prepare_output

    count = len(args.runs)
    if count < 2:
        raise MergeError(f"give at least two runs to merge, got {count}")
    weights = None
    if args.weights is not None:
        weights = check_weights(parse_weights(args.weights, count), count, args.normalize)
    elif args.normalize:
        raise MergeError("--normalize needs --weights (the default weights are already equal)")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if args.sweep:
        if count != 2:
            raise MergeError(f"--sweep interpolates between exactly two runs, got {count}")
        int_at_least("", "--points", args.points, 2)
        positive_int("", "--batches", args.batches)
        positive_int("", "--samples", args.samples)
        if not splits:
            raise MergeError(f"--splits {args.splits!r} names no split; expected e.g. val,heldout")
    prepare_output(Path(args.out), [Path(r) for r in args.runs], args.force)
    return weights, splits


def merge_main(argv: list[str]) -> int:
    """Bad input raises (reported in one line by :func:`mmgrow.cli_errors.run_command`)."""
    from mmgrow.merge import check_weights, load_sources, merge_sources, write_merged

    args = build_parser().parse_args(argv)
    weights, splits = check_arguments(args)
    sources = load_sources(args.runs)
    out = Path(args.out)
    written: list[Path] = []
    if args.sweep:
        written += run_sweep(sources, out, args.points, splits, args.batches, args.samples)
    if weights is not None or not args.sweep:
        weights = weights if weights is not None else check_weights(None, len(sources))
        write_merged(sources, weights, merge_sources(sources, weights), out, normalized=args.normalize)
        written += [out / "model.safetensors", out / "model.yaml", out / "merge.json"]
    print("\n".join(str(p) for p in written))
    return 0


# -- the sweep ------------------------------------------------------------------------------------------------
def lambdas(points: int) -> list[float]:
    """``points`` values evenly spaced in [0, 1], exactly 0 and 1 at the ends."""
    return [i / (points - 1) for i in range(points)]


def split_loss(model: Any, objective: Any, datamodule: Any, split: str, batches: int) -> float:
    """Mean of ``objective.step``'s loss over the first ``batches`` evaluation batches of ``split``."""
    import torch

    builder = datamodule.batch_builder(split)
    keys = datamodule.eval_keys(split)[:batches]
    if not keys:
        raise ValueError(f"split {split!r} of the run's data has no evaluation batches")
    with torch.no_grad():
        losses = [float(objective.step(model, builder[key])[0]) for key in keys]
    return sum(losses) / len(losses)


def run_sweep(sources: Sequence[Any], out: Path, points: int, splits: Sequence[str], batches: int,
              samples: int) -> list[Path]:
    """Evaluate the interpolation between the two sources (module docstring); write JSON and plot into ``out``."""
    from mmgrow.evaluation import tasks as task_eval
    from mmgrow.merge import merge_sources
    from mmgrow.rundir import atomic_write_bytes, strict_json
    from mmgrow.training.generate_cli import load_run

    model, objective, dm = load_run(sources[0].path)
    unknown = [s for s in splits if s not in dm.source_sets]
    if unknown:
        raise ValueError(f"--splits: unknown split(s) {unknown}; the run's data has {sorted(dm.source_sets)}")
    # The tasks of both runs are scored (two task fine-tunes each know only their own task); the loss is A's.
    scored = [dm] + [other for other in second_data(sources[1].path) if _new_sources(other, dm)]
    grid = lambdas(points)
    result: dict[str, Any] = {"runs": [str(s.path.resolve()) for s in sources], "lambdas": grid,
                              "batches": batches, "samples": samples,
                              "splits": {s: {"loss": [], "tasks": {}} for s in splits}}
    for lam in grid:
        model.load_state_dict(merge_sources(sources, [1.0 - lam, lam]))
        model.eval()
        for split in splits:
            record = result["splits"][split]
            record["loss"].append(split_loss(model, objective, dm, split, batches))
            for data in scored:
                for source, metrics in task_eval.evaluate_tasks(model, objective, data, split=split,
                                                                num_samples=samples).items():
                    if data is not dm and source in _source_names(dm):
                        continue  # the first run's source of that name is already scored
                    per_task = record["tasks"].setdefault(source, {})
                    for name, value in metrics.items():
                        if name not in ("task", "samples"):
                            per_task.setdefault(name, []).append(float(value))
    atomic_write_bytes(out / SWEEP_RECORD, strict_json(result))
    plot_sweep(result, out / SWEEP_PLOT)
    return [out / SWEEP_RECORD, out / SWEEP_PLOT]


def second_data(run: Path) -> list[Any]:
    """The data module of the second run's recipe (``[]`` for a model directory without ``config.yaml``)."""
    from mmgrow.training.generate_cli import load_run_data

    if not (Path(run) / "config.yaml").is_file():
        return []
    return [load_run_data(Path(run))]


def _source_names(datamodule: Any) -> set[str]:
    return {s.name for s in getattr(datamodule, "sources", [])}


def _new_sources(other: Any, first: Any) -> bool:
    """Whether ``other`` has a source (by name) that ``first`` lacks."""
    return bool(_source_names(other) - _source_names(first))


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """One panel for the loss and one per scored task (its main metric) against lambda; one line per split."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmgrow.evaluation.media import atomic_write
    from mmgrow.evaluation.tasks import main_metric

    splits = result["splits"]
    sources = list(dict.fromkeys(src for rec in splits.values() for src, m in rec["tasks"].items() if m))
    fig = Figure(figsize=(4 * (1 + len(sources)), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(sources), squeeze=False)[0]
    for split, rec in splits.items():
        axes[0].plot(result["lambdas"], rec["loss"], marker="o", markersize=3, label=split)
        for ax, source in zip(axes[1:], sources, strict=True):
            metrics = rec["tasks"].get(source)
            if metrics:
                name, _ = main_metric({k: v[0] for k, v in metrics.items()})  # accuracy, else the first
                ax.plot(result["lambdas"], metrics[name], marker="o", markersize=3, label=split)
                ax.set_title(f"{source}: {name}")
    axes[0].set_title("loss")
    for ax in axes:
        ax.set_xlabel("lambda (0 = first run, 1 = second)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))
