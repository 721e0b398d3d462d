"""``mmgrow ablate``: train a base recipe's named variants (x a grid x seeds) with the same data and budget.

    mmgrow ablate --config BASE --out DIR [--variants FILE] [--vary KEY=V1,V2,...]... [--set KEY=VALUE]...
                  [--seeds K|S1,S2,...] [--match-params] [--launcher local|slurm|torchrun] [--jobs N]
                  [--dry-run] [--only RUN]

Overrides apply in this order, later ones winning: the variant's keys, the ``--vary`` grid point, ``--set``,
the width ``--match-params`` chose, ``seed_everything``. Runs land in ``DIR/runs/<variant>[/<grid point>]/s<seed>``
(each with ``ablation_run.json``), the plan in ``DIR/ablation.json``, logs in ``DIR/logs/``. The same command again
resumes: complete runs are skipped, partial ones resume from ``checkpoints/last.ckpt``. Then ``mmgrow report DIR``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mmgrow.ablation.plan import (
    PLAN_NAME,
    AblationRun,
    check_same_plan,
    expand,
    format_runs,
    grid_points,
    read_plan,
    write_plan,
)
from mmgrow.ablation.variants import AblationSpec, parse_seeds, parse_set, parse_vary, read_variants


def _parser() -> argparse.ArgumentParser:
    from mmgrow.cli_text import plain_text

    p = argparse.ArgumentParser(prog="mmgrow ablate", description=plain_text(__doc__.split("\n\n")[0]),
                                epilog=plain_text(__doc__.split("\n\n")[2]))
    p.add_argument("--config", required=True, help="the base recipe (YAML)")
    p.add_argument("--out", required=True, help="the ablation directory (plan, runs, logs, launchers)")
    p.add_argument("--variants", help="YAML: variant name -> {dotted key: value} ({} = the base recipe); "
                                      "without it one variant, 'base'")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a grid over KEY (repeatable: the cross product), applied to every variant; values are YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_",
                   help="set KEY on every run; applied LAST, so it wins over variants and --vary")
    p.add_argument("--seeds", metavar="K|S1,S2", help="seed_everything 0..K-1 (or the listed seeds) for every "
                                                      "variant; default: the recipe's seed_everything (or 0). "
                                                      "The data seed stays the recipe's")
    p.add_argument("--match-params", action="store_true",
                   help="adjust --match-key so every variant's non-embedding parameters match the first variant's")
    p.add_argument("--match-key", default="model.dim", help="the integer width key --match-params adjusts")
    p.add_argument("--match-multiple", type=int, help="the key moves in multiples of this (default: the smallest "
                                                      "multiple of the lcm of the variant's num_heads that is >= 8)")
    p.add_argument("--match-tolerance", type=float, default=0.05, help="largest relative parameter gap (0.05)")
    p.add_argument("--match-best-effort", action="store_true",
                   help="keep the closest width when the tolerance cannot be met (default: an error)")
    p.add_argument("--launcher", choices=("local", "slurm", "torchrun"), default="local",
                   help="local: run here now; slurm/torchrun: write DIR/launch/ scripts for a cluster")
    p.add_argument("--jobs", type=int, default=1, help="local runs at a time (threads split between them)")
    p.add_argument("--nproc", type=int, default=1, help="torchrun: processes per run (DDP when > 1)")
    p.add_argument("--sbatch", action="append", default=[],
                   help="slurm: an #SBATCH option, written --sbatch=--gres=gpu:1 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and every override; write nothing")
    p.add_argument("--only", help="run (or resume) just this run name (what each SLURM array task calls)")
    return p


def _recipe_seed(base_cfg: Any) -> int:
    seed = base_cfg.get("seed_everything") if isinstance(base_cfg, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def build_spec(args: argparse.Namespace, base_cfg: Any) -> AblationSpec:
    variants = read_variants(args.variants) if args.variants else {"base": {}}
    return AblationSpec(variants=variants, vary=parse_vary(args.vary), set=parse_set(args.set_),
                        seeds=parse_seeds(args.seeds, _recipe_seed(base_cfg)))


def make_plan(base: Path, spec: AblationSpec, out: Path, match: dict[str, Any] | None,
              reuse: bool = True) -> dict[str, Any]:
    """The plan: the spec, the matching (when asked), every run; checked against an existing plan in ``out``."""
    old = read_plan(out) if reuse else None
    widths: dict[str, dict[str, Any]] = {}
    matching = None
    if match is not None:
        from mmgrow.ablation.match import match_params

        # counts measured for this very base recipe (same bytes) are reused; an edited recipe is measured again
        same_base = (old or {}).get("base_sha256") == _sha256(base)
        cache = dict((old or {}).get("measured", {})) if same_base else {}
        matching = match_params(base, spec, cache=cache, **match)
        widths = {label: m["overrides"] for label, m in matching["variants"].items()}
    runs = expand(spec, widths)
    if matching is not None:
        for run in runs:
            run.params = matching["variants"][run.variant]["params"]
    check_same_plan(old, runs, out)
    return {"mmgrow_ablation": 1, "base": str(base.resolve()), "base_sha256": _sha256(base),
            "variants": spec.variants, "vary": spec.vary, "set": spec.set, "seeds": spec.seeds,
            "warnings": spec.warnings(),
            "match": None if matching is None else {k: v for k, v in matching.items() if k != "measured"},
            "measured": {} if matching is None else matching["measured"],
            "runs": [r.to_dict() for r in runs], "sessions": (old or {}).get("sessions", [])}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def ablate_command(args: argparse.Namespace) -> list[str]:
    """The command that re-plans this ablation (what each SLURM task runs, with ``--only``)."""
    cmd = [sys.executable, "-m", "mmgrow", "ablate", "--config", str(Path(args.config).resolve()),
           "--out", str(Path(args.out).resolve())]
    if args.variants:
        cmd += ["--variants", str(Path(args.variants).resolve())]
    for v in args.vary:
        cmd += ["--vary", v]
    for s in args.set_:
        cmd += ["--set", s]
    if args.seeds is not None:
        cmd += ["--seeds", str(args.seeds)]
    if args.match_params:
        cmd += ["--match-params", "--match-key", args.match_key, "--match-tolerance", str(args.match_tolerance)]
        if args.match_multiple:
            cmd += ["--match-multiple", str(args.match_multiple)]
        if args.match_best_effort:
            cmd += ["--match-best-effort"]
    return cmd


def ablate_main(argv: list[str]) -> int:
    from mmgrow.checks import read_yaml

    args = _parser().parse_args(argv)
    if args.jobs < 1 or args.nproc < 1:
        raise ValueError(f"--jobs and --nproc must be at least 1, got {args.jobs} and {args.nproc}")
    base = Path(args.config)
    base_cfg = read_yaml(base, "base recipe") or {}
    spec = build_spec(args, base_cfg)
    for line in spec.warnings():
        print(f"warning: {line}", file=sys.stderr)
    out = Path(args.out)
    match = None
    if args.match_params:
        match = {"key": args.match_key, "multiple": args.match_multiple, "tolerance": args.match_tolerance,
                 "best_effort": args.match_best_effort}
    plan = make_plan(base, spec, out, match, reuse=True)
    if plan["match"] is not None:
        from mmgrow.ablation.match import format_matching

        print(format_matching(plan["match"]))
    runs = [AblationRun(**r) for r in plan["runs"]]
    if args.dry_run:
        print(f"ablation of {base} into {out}: {len(runs)} runs ({len(spec.variants)} variants x "
              f"{len(grid_points(spec.vary))} grid points x {len(spec.seeds)} seeds); nothing written (dry run)")
        print(format_runs(runs, out if (out / PLAN_NAME).is_file() else None))
        return 0
    write_plan(out, plan)
    from mmgrow.scaling.launch import choose_only

    runs = choose_only(runs, args.only, out / PLAN_NAME)
    if args.launcher != "local":
        from mmgrow.scaling.launch import todo

        if not todo(runs, out / "runs"):
            print(f"every run of {out} is finished; nothing to launch. Compare them with: mmgrow report {out}")
            return 0
    if args.launcher == "slurm":
        from mmgrow.scaling.launch import write_array_job

        path = write_array_job(ablate_command(args), runs, out, args.sbatch, job="ablate")
        print(f"wrote {path}; submit it with: sbatch {path}; then: mmgrow report {out}")
        return 0
    if args.launcher == "torchrun":
        from mmgrow.scaling.launch import write_torchrun

        path = write_torchrun(base, runs, out, args.nproc)
        print(f"wrote {path}; run it with: NPROC={args.nproc} bash {path}; then: mmgrow report {out}")
        return 0
    return run_here(base, runs, out, args.jobs)


def run_here(base: Path, runs: list[AblationRun], out: Path, jobs: int) -> int:
    """Every run here (finished ones skipped), a summary table, exit status 1 when any run failed."""
    from mmgrow.scaling.launch import report_failures, run_with_progress, status_counts

    start = time.perf_counter()
    session: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": 0.0, "outcomes": {}}

    def record(outcome) -> None:
        # recorded after every run, so an interrupted session still shows what it finished
        session["outcomes"][outcome.name] = {"status": outcome.status, "seconds": outcome.seconds,
                                             "detail": outcome.detail}
        session["wall_seconds"] = time.perf_counter() - start
        _record_session(out, session)

    _record_session(out, session)
    outcomes, seconds = run_with_progress(base, runs, out, jobs, on_outcome=record)
    order = {r.name: i for i, r in enumerate(runs)}
    outcomes.sort(key=lambda o: order[o.name])
    print(summary_table(outcomes))
    status = report_failures(outcomes)
    print(f"ablation: {status_counts(outcomes)} in {seconds:.0f} s; compare the runs with: mmgrow report {out}")
    return status


def summary_table(outcomes: list) -> str:
    width = max([len("run"), *(len(o.name) for o in outcomes)])
    lines = [f"{'run':<{width}}  {'status':<16}  seconds"]
    lines += [f"{o.name:<{width}}  {o.status:<16}  {o.seconds:7.1f}" for o in outcomes]
    return "\n".join(lines)


def _record_session(out: Path, session: dict[str, Any]) -> None:
    """Put ``session`` (this command's) last in the plan's ``sessions``, replacing its previous version."""
    import json

    from mmgrow.rundir import atomic_write_bytes, strict_json

    path = out / PLAN_NAME
    plan = json.loads(path.read_text())
    sessions = plan.setdefault("sessions", [])
    if sessions and sessions[-1].get("started") == session["started"] and session.get("_recorded"):
        sessions.pop()
    sessions.append({k: v for k, v in session.items() if k != "_recorded"})
    session["_recorded"] = True
    atomic_write_bytes(path, strict_json(plan))
