"""Run a sweep's (or an ablation's) runs here (one after another, or ``jobs`` at a time), or write a cluster launcher.

* :func:`run_local`: each run is a ``python -m mmgrow fit`` subprocess (a crash or a divergence ends that run
  only), its output in ``OUT/logs/<run>.log``. A run whose directory is sealed ``complete`` or ``diverged`` is
  skipped; one with ``checkpoints/last.ckpt`` resumes from it (``--ckpt_path``); exit status 3 is the
  divergence guard's (the run seals itself ``diverged`` and is kept out of fits); any other failure is
  reported with the log's last lines and the other runs go on. With ``jobs > 1`` each subprocess gets
  ``OMP_NUM_THREADS = cores // jobs``.
* :func:`write_slurm`: ``OUT/launch/sweep.sbatch``, an array job over the unfinished runs; every task calls
  ``mmgrow scaling sweep ... --only <run>``, which applies the same skip/resume rule on the node, so
  re-submitting the script after a preemption resumes the sweep. :func:`write_array_job` is the same for any
  command that takes ``--only`` (``mmgrow ablate`` uses it).

A run is anything with a ``name`` (its directory under the runs root) and ``overrides`` (dotted key -> value,
replayed as ``mmgrow fit`` arguments): :class:`LaunchRun`.
* :func:`write_torchrun`: ``OUT/launch/torchrun.sh``, one ``torchrun`` command per unfinished run (with
  ``--ckpt_path`` where a checkpoint exists; regenerate it to resume); a failing run does not stop the script.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mmgrow.scaling.sweep import fit_arguments, run_state
from mmgrow.training.divergence import DIVERGED_EXIT_CODE


class LaunchRun(Protocol):
    """What the launchers need of a run: a sweep's :class:`~mmgrow.scaling.sweep.SweepRun`, an ablation's run."""

    name: str                   # its directory under the runs root ("a/b/s0" nests)
    overrides: dict[str, Any]   # dotted key -> value, replayed as `mmgrow fit --key value`


@dataclass
class RunOutcome:
    name: str
    status: str            # complete | diverged | failed | skipped-complete | skipped-diverged
    seconds: float = 0.0
    detail: str = ""       # resume note, or the failure's exit status and last log lines


def todo(runs: list[LaunchRun], root: Path) -> list[LaunchRun]:
    """Runs whose directory is not sealed complete or diverged."""
    return [r for r in runs if run_state(root / r.name) not in ("complete", "diverged")]


def run_one(base: str | Path, run: LaunchRun, root: Path, logs: Path, threads: int | None = None) -> RunOutcome:
    """Train (or resume, or skip) one run in a subprocess; never raises for a failed run."""
    directory = root / run.name
    state = run_state(directory)
    if state in ("complete", "diverged"):
        return RunOutcome(run.name, f"skipped-{state}")
    ckpt = str(directory / "checkpoints" / "last.ckpt") if state == "partial" else None
    log = logs / f"{run.name.replace('/', '__')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ mmgrow {shlex.join(fit_arguments(base, run, root, ckpt))}\n")
        out.flush()
        code = subprocess.call([sys.executable, "-m", "mmgrow", *fit_arguments(base, run, root, ckpt)],
                               stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    resumed = f"resumed from {ckpt}" if ckpt else ""
    if code == 0 and run_state(directory) == "complete":
        return RunOutcome(run.name, "complete", seconds, resumed)
    if code == DIVERGED_EXIT_CODE or run_state(directory) == "diverged":
        return RunOutcome(run.name, "diverged", seconds, _tail(log, 1))
    return RunOutcome(run.name, "failed", seconds, f"exit status {code}; {log}: {_tail(log, 5)}")


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def run_local(base: str | Path, runs: list[LaunchRun], root: Path, logs: Path, jobs: int = 1,
              on_outcome: Callable[[RunOutcome], None] | None = None) -> list[RunOutcome]:
    """Every run of ``runs`` (skipping finished ones), ``jobs`` at a time; ``on_outcome`` after each."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    outcomes: list[RunOutcome] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run_one, base, r, root, logs, threads) for r in runs]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes


def choose_only(runs: list[LaunchRun], only: str | None, plan: Path) -> list[LaunchRun]:
    """``runs`` (``only`` None), or the one run named ``only`` (what a SLURM array task asks for); a ValueError
    naming the plan file when no run has that name."""
    if only is None:
        return runs
    chosen = [r for r in runs if r.name == only]
    if not chosen:
        raise ValueError(f"--only {only!r}: no such run in {plan}; runs are e.g. {runs[0].name}")
    return chosen


def run_with_progress(base: str | Path, runs: list[LaunchRun], out: Path, jobs: int,
                      on_outcome: Callable[[RunOutcome], None] | None = None) -> tuple[list[RunOutcome], float]:
    """:func:`run_local` into ``out/runs`` (logs in ``out/logs``) with one progress line per finished run,
    ``[i/n] <run>: <status> <seconds>s (<detail>)``, then ``on_outcome``; returns the outcomes and the wall
    seconds. What sweeps and ablations share when they run here."""
    start = time.perf_counter()
    done = {"n": 0}

    def progress(outcome: RunOutcome) -> None:
        done["n"] += 1
        extra = f" ({outcome.detail})" if outcome.detail else ""
        print(f"[{done['n']}/{len(runs)}] {outcome.name}: {outcome.status} {outcome.seconds:.0f}s{extra}", flush=True)
        if on_outcome is not None:
            on_outcome(outcome)

    outcomes = run_local(base, runs, out / "runs", out / "logs", jobs, on_outcome=progress)
    return outcomes, time.perf_counter() - start


def report_failures(outcomes: list[RunOutcome]) -> int:
    """Each failed run's detail on stderr; the command's exit status (1 when any run failed, else 0)."""
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        print(f"  failed: {o.name}: {o.detail}", file=sys.stderr)
    return 1 if failed else 0


def status_counts(outcomes: list[RunOutcome]) -> dict[str, int]:
    return {s: sum(o.status == s for o in outcomes) for s in sorted({o.status for o in outcomes})}


def sweep_command(base: str | Path, grid: str | Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mmgrow", "scaling", "sweep", "--config", str(Path(base).resolve()),
            "--grid", str(Path(grid).resolve()), "--out", str(out.resolve())]


def write_slurm(base: str | Path, grid: str | Path, runs: list[LaunchRun], out: Path,
                sbatch: list[str] | None = None) -> Path:
    """``OUT/launch/sweep.sbatch``: an array job, one task per unfinished run (module docstring)."""
    return write_array_job(sweep_command(base, grid, out), runs, out, sbatch, job="sweep")


def write_array_job(command: list[str], runs: list[LaunchRun], out: Path, sbatch: list[str] | None = None,
                    job: str = "sweep") -> Path:
    """``OUT/launch/<job>.sbatch``: a SLURM array job whose task ``i`` runs ``command --only <i-th unfinished run>``;
    ``command`` must apply the skip/resume rule itself (``mmgrow scaling sweep``, ``mmgrow ablate``)."""
    pending = todo(runs, out / "runs")
    path = out / "launch" / f"{job}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    names = " ".join(shlex.quote(r.name) for r in pending)
    lines = ["#!/bin/bash", f"#SBATCH --job-name=mmgrow-{job}", f"#SBATCH --array=0-{max(len(pending) - 1, 0)}",
             f"#SBATCH --output={(out / 'logs').resolve()}/slurm-%A_%a.log",
             *[f"#SBATCH {a}" for a in sbatch or []],
             f"# {len(pending)} unfinished runs of {len(runs)}; regenerate this script to resume after a stop:",
             f"#   {shlex.join(command)} --launcher slurm",
             f"RUNS=({names})",
             f"srun {shlex.join(command)} --only \"${{RUNS[$SLURM_ARRAY_TASK_ID]}}\"", ""]
    path.write_text("\n".join(lines))
    return path


def write_torchrun(base: str | Path, runs: list[LaunchRun], out: Path, nproc: int = 1) -> Path:
    """``OUT/launch/torchrun.sh``: one ``torchrun`` command per unfinished run (module docstring)."""
    root = out / "runs"
    path = out / "launch" / "torchrun.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {len(todo(runs, root))} unfinished runs of {len(runs)}; a failing run does not stop the others; "
              "regenerate this script to resume.")
    lines = ["#!/bin/bash", header, f"NPROC=${{NPROC:-{nproc}}}"]
    for run in todo(runs, root):
        state = run_state(root / run.name)
        ckpt = str((root / run.name / "checkpoints" / "last.ckpt").resolve()) if state == "partial" else None
        args = fit_arguments(Path(base).resolve(), run, root.resolve(), ckpt)
        if nproc > 1:
            args += ["--trainer.devices", "$NPROC", "--trainer.strategy", "ddp"]
        quoted = " ".join("$NPROC" if a == "$NPROC" else shlex.quote(a) for a in args)
        lines.append(f"torchrun --standalone --nproc_per_node=$NPROC -m mmgrow {quoted} "
                     f"|| echo \"run {run.name} failed (exit $?)\" >&2")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path
