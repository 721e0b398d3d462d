"""``mmgrow scaling fit|predict|plot|sweep``: the scaling-law toolkit on the command line.

    mmgrow scaling sweep   --config BASE --grid GRID --out DIR [...]        (mmgrow.scaling.sweep_cli)
    mmgrow scaling fit     RUNS --out laws.json [--band 0.0025] [--bootstrap 200] [--seed 0]
                           [--loss-form chinchilla|video_dit] [--fixed-lr X --fixed-batch-size Y]
    mmgrow scaling predict laws.json --params N --tokens T [--json] [--level 0.9]
    mmgrow scaling predict laws.json --flops C [--json]
    mmgrow scaling plot    RUNS [--laws laws.json] --out DIR

RUNS is a directory tree of run directories (a sweep's ``runs/``) or a ``.csv`` / ``.jsonl`` table with the
columns params, tokens, lr, batch_size, loss (plain units: parameters, tokens, tokens per step).
``predict --json`` prints one JSON object: ``lr_opt``, ``batch_size_opt``, ``loss`` (and with ``--flops``
``params_opt``, ``tokens_opt``), ``intervals`` ({key: [lo, hi]} bootstrap percentiles), ``units``, ``warnings``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = "mmgrow scaling {sweep,fit,predict,plot} ...  (mmgrow scaling SUBCOMMAND --help)"


def _fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgrow scaling fit", description="fit scaling laws to runs; write laws.json")
    p.add_argument("runs", help="a directory of run directories, or a .csv / .jsonl table")
    p.add_argument("--out", required=True, help="the laws file to write (JSON)")
    p.add_argument("--band", type=float, default=0.0025, help="near-optimal band: runs within this fraction of a "
                   "cell's best loss (DeepSeek: 0.0025)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-form", choices=("chinchilla", "video_dit"), default="chinchilla")
    p.add_argument("--fixed-lr", type=float, help="lr of the fixed-hyperparameter loss law (default: the pair "
                   "present in most cells)")
    p.add_argument("--fixed-batch-size", type=float, help="batch size (tokens) of the fixed-hyperparameter law")
    p.add_argument("--radius", type=int, default=1, help="grid steps around a cell's best run used by its quadratic")
    return p


def fit_main(argv: list[str]) -> int:
    from mmgrow.scaling.study import fit_study, write_laws
    from mmgrow.scaling.table import load_runs

    args = _fit_parser().parse_args(argv)
    if args.bootstrap < 0 or not 0 <= args.band < 1:
        raise ValueError(f"--bootstrap must be >= 0 and --band in [0, 1), got {args.bootstrap} and {args.band}")
    table = load_runs(args.runs)
    study = fit_study(table, band=args.band, bootstrap=args.bootstrap, seed=args.seed, loss_form=args.loss_form,
                      fixed_lr=args.fixed_lr, fixed_batch_size=args.fixed_batch_size, radius=args.radius)
    path = write_laws(args.out, study)
    print(format_study(study))
    print(f"wrote {path}")
    return 0


def format_study(study: dict) -> str:
    """A readable summary of a ``laws.json`` dict: each law (constants rounded for display only) with intervals."""
    from mmgrow.scaling.fit_result import FitResult

    data = study["data"]
    lines = [(f"{data['rows']} rows from {data['source']} ({len(data['excluded'])} excluded); "
             f"lr schedule: {study['units'].get('lr_schedule')}")]
    for key in ("lr_opt", "batch_size_opt", "loss", "loss_fixed_hparams"):
        if study.get(key) is None:
            continue
        fit = FitResult.from_dict(study[key])
        ci = fit.intervals(0.9)
        spans = ", ".join(f"{k} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in ci.items())
        label = key if key != "loss_fixed_hparams" else (f"loss at fixed lr={study['fixed_hparams']['lr']:g}, "
                                                         f"batch={study['fixed_hparams']['batch_size']:g}")
        lines.append(f"  {label}: {fit.law.describe()}  (rms log residual {fit.residual:.3g}, {fit.n_points} points)")
        if spans:
            lines.append(f"      90% bootstrap intervals: {spans}")
        lines += [f"      note: {n}" for n in fit.notes]
    methods = {}
    for c in study.get("cells", []):
        methods[c["method"]] = methods.get(c["method"], 0) + 1
    if methods:
        lines.append(f"  cell optima: {methods}")
    lines += [f"  excluded: {e['run']}: {e['reason']}" for e in data["excluded"][:10]]
    if len(data["excluded"]) > 10:
        lines.append(f"  ... and {len(data['excluded']) - 10} more excluded (laws.json data.excluded)")
    lines += [f"  warning: {w}" for w in data["warnings"]]
    return "\n".join(lines)


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgrow scaling predict", description="predict from a laws file")
    p.add_argument("laws", help="laws.json from `mmgrow scaling fit`")
    p.add_argument("--params", type=float, help="N, non-embedding parameters (plain count)")
    p.add_argument("--tokens", type=float, help="T, training tokens (plain count)")
    p.add_argument("--flops", type=float, help="C, training FLOPs (C = 6 N T): the compute-optimal N and T")
    p.add_argument("--level", type=float, default=0.9, help="interval coverage (default 0.9)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def predict_main(argv: list[str]) -> int:
    from mmgrow.scaling.study import predict, read_laws

    args = _predict_parser().parse_args(argv)
    for name in ("params", "tokens", "flops"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name} must be a positive number in plain units, got {value}")
    result = predict(read_laws(args.laws), params=args.params, tokens=args.tokens, flops=args.flops, level=args.level)
    if args.json:
        print(json.dumps(result))
        return 0
    for key in ("flops", "params_opt", "tokens_opt", "params", "tokens", "lr_opt", "batch_size_opt", "loss"):
        if key not in result:
            continue
        value = result[key]
        span = (result["intervals"].get(key) if key in result["intervals"] else None)
        interval = f"   [{span[0]:.4g}, {span[1]:.4g}] ({result['level']:.0%})" if span else ""
        print(f"{key:>15}: {'n/a' if value is None else f'{value:.4g}'}{interval}")
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmgrow scaling plot", description="plots of runs and fitted laws (PNG)")
    p.add_argument("runs", nargs="?", help="runs (directory tree, .csv or .jsonl)")
    p.add_argument("--laws", help="laws.json from `mmgrow scaling fit`")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--level", type=float, default=0.9, help="coverage of the bootstrap bands")
    args = p.parse_args(argv)
    if args.runs is None and args.laws is None:
        raise ValueError("mmgrow scaling plot: give RUNS, --laws laws.json, or both")
    from mmgrow.scaling.plots import plot_scaling
    from mmgrow.scaling.study import read_laws
    from mmgrow.scaling.table import load_runs

    table = load_runs(args.runs) if args.runs else None
    study = read_laws(args.laws) if args.laws else None
    for path in plot_scaling(table, study, Path(args.out), level=args.level):
        print(path)
    return 0


def _sweep(argv: list[str]) -> int:
    from mmgrow.scaling.sweep_cli import sweep_main

    return sweep_main(argv)


SUBCOMMANDS = {"sweep": _sweep, "fit": fit_main, "predict": predict_main, "plot": plot_main}


def scaling_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        from mmgrow.cli_text import plain_text

        print(f"usage: {USAGE}\n\n{plain_text(__doc__)}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        raise ValueError(f"unknown scaling subcommand {argv[0]!r}; expected one of {', '.join(SUBCOMMANDS)}")
    return SUBCOMMANDS[argv[0]](argv[1:])
