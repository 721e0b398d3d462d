"""``mmgrow report DIR [DIR ...] [--out OUT] [--metrics KEY ...]``: compare run directories.

Each DIR is a run directory or a tree of them (an ablation's output, a sweep, a ``runs/`` folder). Writes
OUT/report.md (tables, automatic Elo, plots), OUT/report.json (the same numbers) and PNGs in OUT/report/.
OUT defaults to the first DIR (the only one, when one is given).
"""

from __future__ import annotations

import argparse


def _parser() -> argparse.ArgumentParser:
    from mmgrow.cli_text import plain_text

    p = argparse.ArgumentParser(prog="mmgrow report", description=plain_text(__doc__.split("\n\n", 1)[1]))
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or directories holding them")
    p.add_argument("--out", help="where report.md, report.json and report/*.png go (default: the first DIR)")
    p.add_argument("--metrics", nargs="+", metavar="KEY",
                   help="only these columns (exact keys or fnmatch patterns, e.g. final_val_loss 'heldout.probe.*')")
    return p


def report_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from mmgrow.report.write import write_report

    report = write_report(args.dirs, args.out, args.metrics)
    out = report["out"]
    statuses: dict[str, int] = {}
    for r in report["runs"]:
        kind = "unreadable" if r["status"].startswith("unreadable") else r["status"]
        statuses[kind] = statuses.get(kind, 0) + 1
    print(f"report: {len(report['runs'])} run(s) ({', '.join(f'{n} {k}' for k, n in statuses.items())}) in "
          f"{len(report['groups'])} variant(s) -> {out}/report.md, {out}/report.json, {out}/report/*.png")
    return 0
