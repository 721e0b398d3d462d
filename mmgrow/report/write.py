"""Write ``OUT/report.md``, ``OUT/report.json`` and the PNGs in ``OUT/report/`` (every file atomically)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmgrow.report.build import PLOTS_DIR, build
from mmgrow.report.elo import automatic_elo, elo_markdown
from mmgrow.report.metrics import FIXED
from mmgrow.report.table import group_table, run_table
from mmgrow.rundir import atomic_write_bytes, strict_json

MEMORY_NOTE = {"cpu": "CPU: peak resident set size of the training process",
               "cuda": "CUDA: torch.cuda.max_memory_allocated"}


def write_report(dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                 metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the report of ``dirs`` into ``out`` (default: the first of ``dirs``); returns what report.json holds
    plus ``"plot_data"`` (what each plot drew, for tests; not serialised)."""
    if not dirs:
        raise ValueError("report: no directory given; expected one or more run directories or directories of them")
    out = Path(out if out is not None else dirs[0])
    report = build(dirs, metrics)
    records = report.pop("_records")
    complete = {g: [r for r in runs if r.complete] for g, runs in records.items()}
    complete = {g: runs for g, runs in complete.items() if runs}
    plots_dir = out / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_data, captions = _plots(report, complete, plots_dir)
    elo, elo_note = automatic_elo({g: [r.path for r in runs] for g, runs in complete.items()})
    report.update({"out": str(out), "elo": elo, "elo_note": elo_note, "plots": captions,
                   "memory": _memory_note(complete)})
    serialisable = {**report, "groups": {g: {**row, "stats": {c: s.to_dict() for c, s in row["stats"].items()
                                                               if c in report["columns"]}}
                                         for g, row in report["groups"].items()}}
    atomic_write_bytes(out / "report.json", strict_json(serialisable))
    atomic_write_bytes(out / "report.md", markdown_report(report).encode("utf-8"))
    return {**report, "plot_data": plot_data}


def _plots(report: dict[str, Any], complete: dict[str, list], plots_dir: Path) -> tuple[dict, dict]:
    from mmgrow.report.plots import plot_bars, plot_losses, plot_panels

    groups = report["groups"]
    data: dict[str, Any] = {}
    captions: dict[str, str] = {}
    for axis, name in (("tokens", "loss_vs_tokens.png"), ("time", "loss_vs_time.png")):
        data[name] = plot_losses(complete, axis, plots_dir / name)
        what = "tokens" if axis == "tokens" else "wall time"
        captions[name] = (f"Train (solid) and val (dashed) loss vs {what}, mean over seeds, band = min–max over "
                          f"seeds. x: {data[name]['caption']}.")
    data["throughput.png"] = plot_bars({g: groups[g]["stats"]["tokens_per_s"] for g in complete
                                        if "tokens_per_s" in groups[g]["stats"]}, "tokens/s",
                                       plots_dir / "throughput.png")
    captions["throughput.png"] = "Training throughput (tokens/s), mean over seeds, error bar = sample std."
    memory = _memory_note(complete)
    data["memory.png"] = plot_bars({g: groups[g]["stats"]["peak_memory_mib"] for g in complete
                                    if "peak_memory_mib" in groups[g]["stats"]}, "peak memory (MiB)",
                                   plots_dir / "memory.png")
    captions["memory.png"] = f"Peak memory (MiB; {memory}), mean over seeds, error bar = sample std."
    evaluation = [c for c in report["columns"] if c not in FIXED]
    if evaluation:
        data["metrics.png"] = plot_panels({c: {g: groups[g]["stats"][c] for g in complete} for c in evaluation},
                                          plots_dir / "metrics.png")
        drawn = len(data["metrics.png"])
        captions["metrics.png"] = (f"Evaluation metrics, one panel each ({drawn} of {len(evaluation)} drawn), mean "
                                   "over seeds, error bar = sample std.")
    return data, captions


def _memory_note(complete: dict[str, list]) -> str:
    devices = sorted({str(r.summary.get("device") or "unknown").split(":")[0] for runs in complete.values()
                      for r in runs})
    return "; ".join(MEMORY_NOTE.get(d, f"{d}: as the run recorded it") for d in devices) or "no complete run"


def markdown_report(report: dict[str, Any]) -> str:
    columns = report["columns"]
    n_runs = len(report["runs"])
    lines = ["# Run report", "",
             f"{n_runs} run(s) in {len(report['groups'])} variant(s), found below: "
             + ", ".join(f"`{s}`" for s in report["sources"]) + ".", "",
             "## Variants", "", group_table(report["groups"], columns), "", report["definition"], ""]
    fixed = [c for c in columns if c in FIXED]
    if fixed:
        lines += ["Columns: " + "; ".join(f"{FIXED[c].label} = summary.json `{FIXED[c].source}`" for c in fixed)
                  + ".", ""]
    if "peak_memory_mib" in columns:
        lines += [f"Peak memory: {report['memory']}.", ""]
    lines += ["## Automatic Elo", ""]
    lines += elo_markdown(report["elo"]) if report["elo"] else [f"Automatic Elo {report['elo_note']}."]
    lines += ["", "## Runs", "", run_table(report["runs"], columns), "", "## Plots", ""]
    for name, caption in report["plots"].items():
        lines += [f"![{name}]({PLOTS_DIR}/{name})", "", caption, ""]
    return "\n".join(lines)

