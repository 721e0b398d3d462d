"""The report's automatic Elo: :func:`mmgrow.evaluation.elo.pairwise_elo` over the complete runs of each group.

The judge is the attribute probe (samples of two runs on the same held-out prompt: the one the probe finds closer
to what was asked wins). It is an **automatic stand-in** for the human Elo of the one-minute-video paper, not a
measurement of the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STAND_IN = ("Automatic stand-in for the seed paper's human Elo: every pair of runs from different variants is "
            "compared on the same held-out prompts, judged by the attribute probe (higher probe score wins, equal "
            "is a tie); ratings are Bradley-Terry on the Elo scale with a 95 % bootstrap interval over prompts (all games of a drawn prompt together).")


def automatic_elo(groups: dict[str, list[Path]]) -> tuple[dict[str, Any] | None, str]:
    """``(result of pairwise_elo or None, note)``; the note says why there is no result."""
    try:  # the one place that tolerates a missing evaluation.elo (it lands separately)
        from mmgrow.evaluation.elo import pairwise_elo
    except ImportError as exc:
        return None, f"not computed: mmgrow.evaluation.elo is not available ({exc})"
    usable = {g: paths for g, paths in groups.items() if paths}
    if len(usable) < 2:
        return None, "not computed: fewer than two variants with complete runs"
    try:
        result = pairwise_elo(usable)
    except (OSError, ValueError) as exc:  # a corrupt samples/heldout.json: the rest of the report still stands
        return None, f"not computed: {' '.join(str(exc).split())}"
    if result is None:
        return None, "not computed: fewer than two variants have probe readings on the same held-out prompts"
    return result, ""


def elo_markdown(result: dict[str, Any]) -> list[str]:
    """The section's lines: the stand-in sentence, games and prompts, and one row per variant (best first)."""
    games = (f"{result.get('games', 0)} games on {result.get('prompts', 0)} prompts (judge: "
             f"{result.get('judge', 'attribute probe')}, method: {result.get('method', 'bradley_terry')}).")
    lines = [STAND_IN, "", games,
             "", "| variant | Elo | 95 % interval | wins / ties / losses |", "|---|---|---|---|"]
    ratings = result.get("ratings") or {}
    wins = result.get("wins") or {}
    for name in sorted(ratings, key=lambda n: -float(ratings[n]["elo"])):
        r = ratings[name]
        w, t, lo = (sum(int(v[i]) for v in (wins.get(name) or {}).values()) for i in range(3))
        lines.append(f"| {name} | {float(r['elo']):.0f} | [{float(r['low']):.0f}, {float(r['high']):.0f}] "
                     f"| {w} / {t} / {lo} |")
    return lines
