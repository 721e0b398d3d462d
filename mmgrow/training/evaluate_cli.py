"""``mmgrow evaluate needle|tasks --checkpoint RUN ...``: long-context retrieval, or per-task metrics.

``mmgrow evaluate tasks --checkpoint RUN [--splits val heldout] [--samples 32]`` scores every scored task of
the run's data sources (:mod:`mmgrow.evaluation.tasks`: exact match, caption attributes, IoU ...) and
writes ``tasks.json`` and the table ``tasks.md`` into ``--out`` (default ``RUN/eval/tasks-<n>``); it
works on any directory holding a recipe ``config.yaml`` and weights, e.g. the output of ``mmgrow merge``.

``mmgrow evaluate needle --checkpoint RUN --lengths 256 1024 --depths 0 0.5 1``: long-context retrieval.

Reads a run directory of ``mmgrow fit`` (a completed save: ``model.safetensors`` + ``model.yaml`` and
``config.yaml``, checked against its manifest), rebuilds the codecs of its data section
(``codecs`` / ``codec_args``; a ``condition_encoder`` too) and the objective of its model section,
then scores needle retrieval (:mod:`mmgrow.evaluation.needle`) at every context length (in tokens of
those codecs) and depth. Writes ``needle.json`` and the heat map ``needle.png`` into ``--out``
(default ``RUN/eval/needle-<n>``, the first free ``n``) and prints both paths. Classes named in the
run's config are imported only when trusted (:mod:`mmgrow.trust`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmgrow.cli_text import plain_text

DEFAULT_CODECS = {"text": "bytes", "video": "pixels"}  # MMDataModule's default (no lightning import here)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgrow evaluate", description=plain_text(__doc__.split("\n\n")[0]))
    sub = p.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    n = sub.add_parser("needle", help="needle-retrieval accuracy over context lengths and depths (JSON + heat map)",
                       description="Needle-retrieval accuracy of a trained run over context lengths and depths.")
    n.add_argument("--checkpoint", required=True, help="run directory of `mmgrow fit` (model.safetensors, config.yaml)")
    n.add_argument("--lengths", type=int, nargs="+", required=True,
                   help="context lengths in tokens of the run's codecs (haystack + question)")
    n.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1] (0 = start of the haystack, 1 = its end)")
    n.add_argument("--samples", type=int, default=8, help="examples per (length, depth) cell")
    n.add_argument("--kind", choices=("text", "video"), default="text", help="haystack of text or of video frames")
    n.add_argument("--seed", type=int, default=0, help="seeds the needle examples")
    n.add_argument("--out", help="output directory (default RUN/eval/needle-<n>)")
    t = sub.add_parser("tasks", help="per-task metrics of the run's scored tasks (JSON + Markdown table)",
                       description="Per-task metrics (exact match, caption attributes, IoU ...) of a trained run.")
    t.add_argument("--checkpoint", required=True, help="run directory of `mmgrow fit` (model.safetensors, config.yaml)")
    t.add_argument("--splits", nargs="+", choices=("train", "val", "heldout"), default=["val", "heldout"],
                   help="data splits to score")
    t.add_argument("--samples", type=int, default=32, help="items scored per source and split")
    t.add_argument("--out", help="output directory (default RUN/eval/tasks-<n>)")
    return p


def check_needle_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model: a bad value fails before the run is loaded."""
    from mmgrow.checks import finite_number, positive_int

    for length in args.lengths:
        positive_int("", "--lengths", length)
    for depth in args.depths:
        finite_number("", "--depths", depth, low=0, high=1)
    positive_int("", "--samples", args.samples)
    run = Path(args.checkpoint)
    if not run.is_dir():
        raise FileNotFoundError(f"--checkpoint {run} is not a directory; give the run directory of `mmgrow fit`")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is an existing file; give a directory")


def load_for_evaluation(run: Path) -> tuple[Any, Any, Any, Any, dict]:
    """``(model, objective, builder, condition_encoder, data config)`` of a run directory."""
    import mmgrow
    from mmgrow.data.sequence import SequenceBuilder
    from mmgrow.rundir import CONFIG_NAME, WEIGHTS_NAME, check_run
    from mmgrow.training.export import load_model
    from mmgrow.training.generate_cli import instantiate, read_run_config, run_objective

    config, cfg = read_run_config(run)
    check_run(run, (WEIGHTS_NAME, CONFIG_NAME))
    data = cfg.get("data") or {}
    codecs = dict(data.get("codecs") or DEFAULT_CODECS)
    codec_args = data.get("codec_args") or {}
    builder = SequenceBuilder({m: mmgrow.create("tokenizers", name, **(codec_args.get(m) or {}))
                               for m, name in codecs.items()})
    encoder = instantiate(data.get("condition_encoder"), f"{config.name}: data.condition_encoder")
    model = load_model(run)
    model.eval()
    ours, trained = list(builder.token_space.to_dict().items()), list(model.token_space.to_dict().items())
    if ours != trained:  # order too: it fixes the id offsets
        raise ValueError(f"{config}: the data section's codecs give the token space {dict(ours)} but the model "
                         f"was trained with {dict(trained)}")
    objective = run_objective(config, cfg, model)
    if not getattr(objective, "samples_tokens", True):
        raise ValueError(f"the run's objective {type(objective).__name__} samples no tokens; needle retrieval "
                         "decodes a text answer (train with an objective that does, e.g. autoregressive)")
    return model, objective, builder, encoder, data


def run_needle(args: argparse.Namespace) -> list[Path]:
    """Evaluate and write ``needle.json`` / ``needle.png``; returns their paths."""
    from mmgrow.evaluation.needle import evaluate_needle, next_eval_dir, video_frame_args, write_needle_results

    run = Path(args.checkpoint)
    model, objective, builder, encoder, data = load_for_evaluation(run)
    dataset_args = video_frame_args(builder, data.get("dataset_args")) if args.kind == "video" else {}
    result = evaluate_needle(model, objective, builder, lengths=args.lengths, depths=args.depths, samples=args.samples,
                             kind=args.kind, seed=args.seed, dataset_args=dataset_args, condition_encoder=encoder,
                             checkpoint=str(run))
    out = Path(args.out) if args.out else next_eval_dir(run, "needle")
    return list(write_needle_results(result, out))


def run_tasks(args: argparse.Namespace) -> list[Path]:
    """Score the run's tasks and write ``tasks.json`` / ``tasks.md``; returns their paths."""
    import json

    from mmgrow.checks import positive_int
    from mmgrow.evaluation.needle import next_eval_dir
    from mmgrow.evaluation.tasks import evaluate_tasks, tasks_table
    from mmgrow.rundir import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes, check_run
    from mmgrow.training.generate_cli import load_run

    positive_int("", "--samples", args.samples)
    run = Path(args.checkpoint)
    if not run.is_dir():
        raise FileNotFoundError(f"--checkpoint {run} is not a directory; give the run directory of `mmgrow fit`")
    check_run(run, (WEIGHTS_NAME, CONFIG_NAME))
    model, objective, dm = load_run(run, num_val=args.samples)
    if not any(getattr(t, "scored", False) for t in dm.tasks):
        raise ValueError(f"{run}: none of the run's tasks ({[t.name for t in dm.tasks]}) is scored; per-task metrics "
                         "need tasks such as video_qa, image_qa, grounding, audio_caption")
    results = {split: evaluate_tasks(model, objective, dm, split, args.samples) for split in args.splits}
    out = Path(args.out) if args.out else next_eval_dir(run, "tasks")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "tasks.json", json.dumps(results, indent=2).encode())
    atomic_write_bytes(out / "tasks.md", tasks_table(results).encode())
    return [out / "tasks.json", out / "tasks.md"]


def evaluate_main(argv: list[str]) -> int:
    """Bad input raises (reported in one line by :func:`mmgrow.cli_errors.run_command`)."""
    args = build_parser().parse_args(argv)
    if args.evaluation == "tasks":
        print("\n".join(str(p) for p in run_tasks(args)))
        return 0
    check_needle_arguments(args)
    print("\n".join(str(p) for p in run_needle(args)))
    return 0
