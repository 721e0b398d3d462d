"""``mmgrow data inspect``: what a recipe's data section feeds the model, without building the model.

    mmgrow data inspect --config RECIPE [--batches N] [--step S] [--json] [--data.KEY VALUE ...]

Builds only the recipe's :class:`~mmgrow.data.datamodule.MMDataModule` (``--data.*`` overrides as in
``mmgrow fit``), draws the ``N`` training batches (default 8) that an uninterrupted run trains on from
optimizer step ``S`` (default 0; the recipe's ``trainer.accumulate_grad_batches`` maps steps to batches)
and reports:

* per task: ``examples`` drawn, ``tokens`` (their non-padding tokens) and ``weight``, the expected share
  of the item stream under the mixture of the curriculum stage of step ``S`` (extras included:
  :func:`~mmgrow.data.mixture.expected_shares`). Tasks are keyed by task name; when two sources share a
  task, every source is keyed by its source name instead;
* ``rows`` (over the ``N`` batches), ``examples_per_row`` and ``padding_fraction`` (padding tokens over
  all row tokens);
* ``skipped``: the files the datasets skipped, ``{path, reason}`` each.

With ``--json`` it prints one JSON object with exactly the keys ``tasks``, ``rows``,
``examples_per_row``, ``padding_fraction``, ``skipped``; otherwise a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

USAGE = "mmgrow data inspect --config RECIPE [--batches N] [--step S] [--json] [--data.KEY VALUE ...]"


def inspect_data(dm: Any, batches: int = 8, step: int = 0, accumulate: int = 1) -> dict[str, Any]:
    """The report of the module docstring for data module ``dm`` (a single replica's view)."""
    from mmgrow.data.mixture import expected_shares

    sampler = dm.new_train_sampler()
    sampler.accumulate = accumulate
    sampler.skip_to(step * accumulate)
    builder = dm.batch_builder("train")
    examples = [0] * len(dm.sources)
    tokens = [0] * len(dm.sources)
    rows = padding = cells = 0
    for _ in range(batches):
        key, sampler.position = sampler.key(sampler.position)
        built = [builder.example(s, i) for s, i in key.items]
        batch = builder.collate(built, builder.length(key))
        rows += int(batch.input_ids.shape[0])
        padding += int((batch.segment_ids < 0).sum())
        cells += batch.segment_ids.numel()
        for (source, _), example in zip(key.items, built):
            examples[source] += 1
            tokens[source] += len(getattr(example, "sequence", example))
    stage = dm.curriculum.stage_at(step)
    every = {dm.sources[i].name: cnt for i, cnt in dm.stage_every()[stage.index].items() if cnt}
    shares = expected_shares(stage.mixture, every)
    task_names = [s.task for s in dm.sources]
    by_task = len(set(task_names)) == len(task_names)
    tasks = {(s.task if by_task else s.name): {"examples": examples[i], "tokens": tokens[i], "weight": shares.get(s.name, 0.0)}
             for i, s in enumerate(dm.sources)}
    skipped = [{"path": str(f.get("path", "")), "reason": str(f.get("reason", ""))} if isinstance(f, dict)
               else {"path": str(f), "reason": ""} for f in dm.skipped_files()]
    return {"tasks": tasks, "rows": rows, "examples_per_row": sum(examples) / rows if rows else 0.0,
            "padding_fraction": padding / cells if cells else 0.0, "skipped": skipped}


def format_report(report: dict[str, Any], stage: Any, batches: int, step: int) -> str:
    """The human-readable table of :func:`inspect_data`'s report."""
    total = sum(t["examples"] for t in report["tasks"].values()) or 1
    width = max([4, *map(len, report["tasks"])])
    lines = [(f"{batches} training batches from step {step}: curriculum stage {stage.index} ({stage.name}), "
             f"length {stage.length if stage.length is not None else 'longest'}, batch size {stage.batch_size}"),
             "",
             f"{'task':<{width}}  {'examples':>8}  {'tokens':>10}  {'weight':>7}  {'drawn':>7}"]
    for name, t in report["tasks"].items():
        lines.append(f"{name:<{width}}  {t['examples']:>8}  {t['tokens']:>10}  {t['weight']:>7.3f}  "
                     f"{t['examples'] / total:>7.3f}")
    lines += ["", (f"rows {report['rows']}, examples per row {report['examples_per_row']:.3f}, "
                  f"padding fraction {report['padding_fraction']:.3f}"),
              f"skipped files: {len(report['skipped'])}"]
    lines += [f"  {f['path']}: {f['reason']}" for f in report["skipped"]]
    return "\n".join(lines)


def load_recipe_data(recipe: str, overrides: list[str]) -> tuple[Any, int]:
    """``(MMDataModule, trainer.accumulate_grad_batches)`` of ``recipe`` with ``--data.*`` overrides."""
    from jsonargparse import ArgumentParser

    from mmgrow.data.datamodule import MMDataModule
    from mmgrow.training.cli import _rewrite_config_file, rewrite_argv

    cfg = yaml.safe_load(_rewrite_config_file(recipe))  # registry names resolved, import paths checked
    data = cfg.get("data") or {}
    if "class_path" in data:
        if data["class_path"].rsplit(".", 1)[-1] != MMDataModule.__name__:
            raise ValueError(f"{recipe}: data.class_path is {data['class_path']}; `mmgrow data inspect` reads "
                             "recipes of mmgrow.data.datamodule.MMDataModule")
        data = data.get("init_args") or {}
    bad = [a for a in overrides if a.startswith("-") and not a.startswith("--data.")]
    if bad:
        raise ValueError(f"unknown option {bad[0]}; `mmgrow data inspect` takes --config, --batches, --step, --json "
                         f"and --data.* overrides (usage: {USAGE})")
    parser = ArgumentParser(prog="mmgrow data inspect", exit_on_error=False, allow_abbrev=False)
    parser.add_class_arguments(MMDataModule, "data")
    try:
        parsed = parser.parse_args(["--data", json.dumps(data), *rewrite_argv(overrides)])
    except Exception as exc:  # jsonargparse's ArgumentError: a bad value in the recipe or an override
        raise ValueError(f"{recipe}: data section: {exc}") from exc
    dm = parser.instantiate_classes(parsed).data
    trainer = cfg.get("trainer") or {}
    return dm, int(trainer.get("accumulate_grad_batches") or 1)


def _description() -> str:
    from mmgrow.cli_text import plain_text

    return plain_text(__doc__.split("\n\n", 2)[2])  # the docstring after the title and the usage line


def data_main(argv: list[str]) -> int:
    """``mmgrow data SUBCOMMAND ...`` (only ``inspect`` today)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{_description()}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] != "inspect":
        raise ValueError(f"unknown data subcommand {argv[0]!r}; expected: inspect (usage: {USAGE})")
    parser = argparse.ArgumentParser(prog="mmgrow data inspect", usage=USAGE, description=_description(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe (YAML) whose data section is inspected")
    parser.add_argument("--batches", type=int, default=8, help="training batches to draw (default 8)")
    parser.add_argument("--step", type=int, default=0, help="optimizer step to start at (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, rest = parser.parse_known_args(argv[1:])
    if args.batches < 1 or args.step < 0:
        raise ValueError(f"--batches must be >= 1 and --step >= 0, got --batches {args.batches} --step {args.step}")
    if not Path(args.config).exists():
        raise FileNotFoundError(f"config file not found: {args.config}")
    dm, accumulate = load_recipe_data(args.config, rest)
    report = inspect_data(dm, batches=args.batches, step=args.step, accumulate=accumulate)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report, dm.curriculum.stage_at(args.step), args.batches, args.step))
    return 0
