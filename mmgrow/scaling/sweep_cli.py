"""``mmgrow scaling sweep --config base.yaml --grid grid.yaml --out DIR``: plan, run or launch a scaling sweep.

    mmgrow scaling sweep --config BASE --grid GRID --out DIR [--dry-run] [--jobs N]
                         [--launcher local|slurm|torchrun] [--nproc K] [--sbatch "--time=2:00:00" ...]
                         [--only RUN]

``DIR/sweep.json`` holds the plan: the grid, the base recipe, tokens per sample, every size's exact
non-embedding parameters and FLOPs per token (:mod:`~mmgrow.scaling.size`), and every run (its overrides,
budgets, steps). Each run directory ``DIR/runs/<size>/<run>/`` gets a ``scaling.json`` before it starts. The
same command again resumes: finished runs are skipped, checkpointed ones resume (:mod:`~mmgrow.scaling.launch`).
Then ``mmgrow scaling fit DIR/runs --out DIR/laws.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mmgrow.checks import read_optional_json, read_yaml
from mmgrow.rundir import atomic_write_bytes, strict_json
from mmgrow.scaling.grid import SweepGrid
from mmgrow.scaling.sweep import SCALING_RECORD, SweepRun, cli_value, expand, run_state, shares_budgets

PLAN_NAME = "sweep.json"


def _parser() -> argparse.ArgumentParser:
    from mmgrow.cli_text import plain_text

    p = argparse.ArgumentParser(prog="mmgrow scaling sweep", description=plain_text(__doc__.split("\n\n")[0]))
    p.add_argument("--config", required=True, help="the base recipe (YAML)")
    p.add_argument("--grid", required=True, help="the sweep grid (YAML: sizes, lr, batch_size, tokens, ...)")
    p.add_argument("--out", required=True, help="the sweep directory (plan, runs, logs, launchers)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run and write nothing")
    p.add_argument("--launcher", choices=("local", "slurm", "torchrun"), default="local",
                   help="local: run here now; slurm/torchrun: write DIR/launch/ scripts for a cluster")
    p.add_argument("--jobs", type=int, default=1, help="local runs at a time (threads split between them)")
    p.add_argument("--nproc", type=int, default=1, help="torchrun: processes per run (DDP when > 1)")
    p.add_argument("--sbatch", action="append", default=[], help="slurm: an #SBATCH option, e.g. --gres=gpu:1")
    p.add_argument("--only", help="run (or resume) just this run name (what each SLURM array task calls)")
    return p


def sweep_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.jobs < 1 or args.nproc < 1:
        raise ValueError(f"--jobs and --nproc must be at least 1, got {args.jobs} and {args.nproc}")
    base = Path(args.config)
    if not base.is_file():
        raise FileNotFoundError(f"base recipe not found: {base}")
    grid = SweepGrid.from_file(args.grid)
    out = Path(args.out)
    plan = make_plan(base, grid, out, reuse=not args.dry_run)
    runs = [SweepRun(**r) for r in plan["runs"]]
    if args.dry_run:
        print(format_plan(plan, out))
        return 0
    write_plan(out, plan)
    from mmgrow.scaling.launch import choose_only

    runs = choose_only(runs, args.only, out / PLAN_NAME)
    if args.launcher == "slurm":
        from mmgrow.scaling.launch import write_slurm

        path = write_slurm(base, args.grid, runs, out, args.sbatch)
        print(f"wrote {path}; submit it with: sbatch {path}")
        return 0
    if args.launcher == "torchrun":
        from mmgrow.scaling.launch import write_torchrun

        path = write_torchrun(base, runs, out, args.nproc)
        print(f"wrote {path}; run it with: NPROC={args.nproc} bash {path}")
        return 0
    return run_here(base, runs, out, args.jobs)


def run_here(base: Path, runs: list[SweepRun], out: Path, jobs: int) -> int:
    from mmgrow.scaling.launch import report_failures, run_with_progress, status_counts

    outcomes, seconds = run_with_progress(base, runs, out, jobs)
    _record_session(out, outcomes, seconds)
    print(f"sweep: {status_counts(outcomes)} in {seconds:.0f} s; fit it with: mmgrow scaling fit {out / 'runs'} "
          f"--out {out / 'laws.json'}")
    return report_failures(outcomes)


def _record_session(out: Path, outcomes: list, seconds: float) -> None:
    path = out / PLAN_NAME
    plan = json.loads(path.read_text())
    plan.setdefault("sessions", []).append({
        "wall_seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "outcomes": {o.name: {"status": o.status, "seconds": o.seconds, "detail": o.detail} for o in outcomes}})
    atomic_write_bytes(path, strict_json(plan))


def make_plan(base: Path, grid: SweepGrid, out: Path, reuse: bool = True) -> dict[str, Any]:
    """The plan of the module docstring. Sizes already measured in an existing ``DIR/sweep.json`` with the same
    overrides are reused; a run name that exists there with other overrides is an error (a different sweep)."""
    base_cfg = read_yaml(base, "base recipe") or {}
    share = shares_budgets(base_cfg, grid)
    old = _read_plan(out) if reuse else None
    sizes: dict[str, Any] = {}
    tokens_per_sample = grid.tokens_per_sample or (old or {}).get("tokens_per_sample")
    for name, overrides in grid.sizes.items():
        known = (old or {}).get("sizes", {}).get(name)
        if known and known.get("overrides") == overrides and tokens_per_sample:
            sizes[name] = known
            continue
        tokens_per_sample, counts = _measure(base, {**overrides, **_model_keys(grid.set)}, tokens_per_sample)
        sizes[name] = {"overrides": overrides, **counts.to_dict()}
    runs = expand(grid, int(tokens_per_sample), share)
    if old:
        previous = {r["name"]: r for r in old.get("runs", [])}
        for run in runs:
            before = previous.get(run.name)
            if before is not None and before["overrides"] != json.loads(strict_json(run.overrides)):
                raise ValueError(f"{out / PLAN_NAME} holds a different sweep: run {run.name} had overrides "
                                 f"{before['overrides']}, now {run.overrides}; use another --out")
    return {"mmgrow_sweep": 1, "base": str(base.resolve()), "grid": _grid_dict(grid),
            "tokens_per_sample": int(tokens_per_sample), "share_budgets": share,
            "sizes": sizes, "runs": [r.to_dict() for r in runs], "sessions": (old or {}).get("sessions", [])}


def _model_keys(extra: dict[str, Any]) -> dict[str, Any]:
    """The grid's ``set`` keys that change the model (for counting parameters)."""
    return {k: v for k, v in extra.items() if k.startswith("model.")}


def _measure(base: Path, overrides: dict[str, Any], tokens_per_sample: int | None):
    from mmgrow.scaling.size import build_parsed, measure_size, measure_tokens_per_sample

    args = [a for k, v in overrides.items() for a in (f"--{k}", cli_value(v))]
    cli = build_parsed(base, args)
    if not tokens_per_sample:
        tokens_per_sample = measure_tokens_per_sample(cli)
    return tokens_per_sample, measure_size(cli, int(tokens_per_sample))


def _grid_dict(grid: SweepGrid) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(grid)


def _read_plan(out: Path) -> dict[str, Any] | None:
    path = out / PLAN_NAME
    plan = read_optional_json(path, "move it away to start a new sweep here")
    if plan is None:
        return None
    if not isinstance(plan, dict) or plan.get("mmgrow_sweep") != 1:
        raise ValueError(f"{path} is not an mmgrow sweep plan; use another --out")
    return plan


def write_plan(out: Path, plan: dict[str, Any]) -> None:
    """``DIR/sweep.json`` and every run's ``scaling.json`` (written before the run starts)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / PLAN_NAME, strict_json(plan))
    for r in plan["runs"]:
        run = SweepRun(**r)
        directory = out / "runs" / run.name
        directory.mkdir(parents=True, exist_ok=True)
        record = run.record(plan["sizes"][run.size]["non_embedding"])
        atomic_write_bytes(directory / SCALING_RECORD, strict_json(record))


def format_plan(plan: dict[str, Any], out: Path) -> str:
    """A readable plan: sizes with their counts, then one line per run with its state."""
    budgets = "shared (one run validated at every budget)" if plan["share_budgets"] else "one run each"
    lines = [f"sweep of {plan['base']} into {out}: {len(plan['runs'])} runs, "
             + f"{plan['tokens_per_sample']} tokens per sample, budgets {budgets}"]
    for name, s in plan["sizes"].items():
        lines.append(f"  size {name}: N = {s['non_embedding']:,} non-embedding parameters "
                     f"(+{s['embedding']:,} embedding), {s['flops_per_token']:.4g} FLOPs/token")
    total = 0.0
    for r in plan["runs"]:
        state = run_state(out / "runs" / r["name"])
        flops = plan["sizes"][r["size"]]["flops_per_token"] * r["budgets"][-1]
        total += flops
        lines.append(f"  {r['name']}: lr {r['lr']:g}, batch {r['batch_size']} tokens ({r['batch_samples']} samples), "
                     f"budgets {r['budgets']}, {r['max_steps']} steps, {flops:.3g} FLOPs [{state}]")
    lines.append(f"total: {total:.3g} training FLOPs")
    return "\n".join(lines)
