"""Elo ratings from pairwise games, and the automatic judge that turns held-out samples into games.

The seed paper (TTT for one-minute video) rated its methods with a *human* Elo: people compared videos of
two methods made from the same prompt, and TTT-MLP led the baselines by 34 Elo points on average. Here the
comparisons are made by the attribute probe (:mod:`mmgrow.evaluation.probe`): an **automatic stand-in** for
the human raters, which sees only the toy world's shape, colour and motion.

Ratings live on the Elo scale: a player rated ``D`` points above another is expected to score
``P = 1 / (1 + 10 ** (-D / 400))`` against it (``D = 400`` -> 0.909). A game's ``score`` is the first
player's: 1 win, 0.5 tie, 0 loss.

* :func:`elo_sequential` -- the classical online update, which depends on the order of the games.
* :func:`elo_bradley_terry` -- order-independent: the Bradley-Terry ratings that maximise the
  likelihood of the games (ties count half a win each way), with a weak prior (one virtual tie of every
  player against a virtual player rated ``anchor``) so that a player that won or lost every game keeps a
  finite rating; ``prior=0`` gives the plain maximum-likelihood estimate.
* :func:`bootstrap_elo` -- a percentile interval from resampling the games with replacement.
* :func:`probe_games` / :func:`pairwise_elo` -- the judge and the rating of variants' runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

JUDGE = "attribute probe (automatic stand-in for human Elo)"
"""What :func:`pairwise_elo` says judged the games."""


@dataclass(frozen=True)
class Game:
    """One comparison: ``a``'s ``score`` against ``b`` (1 win, 0.5 tie, 0 loss) on ``prompt``."""

    a: str
    b: str
    score: float
    prompt: str = ""

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ValueError(f"Game: a player cannot play itself ({self.a!r})")
        if not isinstance(self.score, (int, float)) or not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"Game({self.a!r}, {self.b!r}): score must be in [0, 1] (1 win, 0.5 tie, 0 loss), "
                             f"got {self.score!r}")


def expected_score(r_a: float, r_b: float) -> float:
    """``E_a = 1 / (1 + 10 ** ((R_b - R_a) / 400))``: a's expected score against b."""
    return 1.0 / (1.0 + 10.0 ** ((r_b - r_a) / 400.0))


def players_of(games: Sequence[Game]) -> list[str]:
    """The players in order of first appearance."""
    return list(dict.fromkeys(p for g in games for p in (g.a, g.b)))


def elo_sequential(games: Sequence[Game], *, k: float = 32.0, initial: float = 1000.0) -> dict[str, float]:
    """Classical online Elo in the order given: ``E_a = 1 / (1 + 10 ** ((R_b - R_a) / 400))``,
    ``R_a += k (S_a - E_a)``, ``R_b -= k (S_a - E_a)``; every player starts at ``initial``."""
    ratings = {p: float(initial) for p in players_of(games)}
    for g in games:
        delta = k * (float(g.score) - expected_score(ratings[g.a], ratings[g.b]))
        ratings[g.a] += delta
        ratings[g.b] -= delta
    return ratings


def elo_bradley_terry(games: Sequence[Game], *, anchor: float = 1000.0, prior: float = 1.0,
                      tol: float = 1e-10, max_iter: int = 200) -> dict[str, float]:
    """Order-independent ratings: Bradley-Terry on the Elo scale, mean rating = ``anchor``.

    Model: ``P(a beats b) = g_a / (g_a + g_b)`` with strengths ``g = 10 ** (R / 400) = exp(theta)``; a tie
    counts as half a win for each side. The ratings maximise the log-likelihood
    ``L = sum_i W_i theta_i - sum_{i<j} n_ij log(exp(theta_i) + exp(theta_j))`` (``n_ij`` games between i and
    j, ``W_i`` i's total score), whose stationarity conditions say that every player's expected score equals
    its actual score: ``sum_j n_ij g_i / (g_i + g_j) = W_i``. ``L`` is concave; it is maximised by Newton's
    method with step halving until no ``theta`` moves by more than ``tol`` (a relative change of the
    strengths below ``tol``).

    ``prior``: virtual ties of every player against a virtual player of fixed strength 1 (``theta = 0``).
    With ``prior > 0`` the estimate always exists and is finite, even for a player that won (or lost) every
    game; it pulls ratings towards each other about as much as ``prior`` drawn games would. ``prior=0`` is
    the plain maximum-likelihood estimate, which exists only when no group of players won every game
    against the rest (a player that won or lost everything raises ``ValueError``).
    """
    if prior < 0 or not math.isfinite(prior):
        raise ValueError(f"elo_bradley_terry: prior must be a finite number >= 0 (virtual ties), got {prior!r}")
    players = players_of(games)
    if not players:
        return {}
    index = {p: i for i, p in enumerate(players)}
    n = len(players)
    between = np.zeros((n, n))  # n_ij
    wins = np.full(n, 0.5 * prior)  # W_i, the virtual ties included
    for g in games:
        i, j = index[g.a], index[g.b]
        between[i, j] += 1.0
        between[j, i] += 1.0
        wins[i] += float(g.score)
        wins[j] += 1.0 - float(g.score)
    if prior == 0 and (np.any(wins <= 0) or np.any(wins >= between.sum(1))):
        raise ValueError("elo_bradley_terry: with prior=0 the maximum-likelihood ratings do not exist: "
                         "a player won or lost every game (use prior > 0 for finite ratings)")

    def loglik(theta: np.ndarray) -> float:
        pair = np.logaddexp(theta[:, None], theta[None, :])
        return float(wins @ theta - 0.5 * (between * pair).sum() - prior * np.logaddexp(theta, 0.0).sum())

    theta = np.zeros(n)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p_ij = P(i beats j)
        p_virtual = 1.0 / (1.0 + np.exp(-theta))
        grad = wins - (between * p).sum(1) - prior * p_virtual
        curvature = between * p * p.T  # -d2L / dtheta_i dtheta_j = -that off the diagonal
        neg_hessian = np.diag(curvature.sum(1) + prior * p_virtual * (1 - p_virtual)) - curvature
        # prior=0: L is flat along theta + c; the minimum-norm solution keeps the step off that direction
        step = np.linalg.lstsq(neg_hessian, grad, rcond=None)[0]
        base = loglik(theta)
        while loglik(theta + step) < base - 1e-12 * abs(base) and np.max(np.abs(step)) > tol:
            step = step / 2
        theta = theta + step
        if np.max(np.abs(step)) < tol:
            break
    else:
        raise ValueError(f"elo_bradley_terry: no convergence to {tol} in {max_iter} Newton steps (are the games "
                         "split into groups that never played each other? use prior > 0)")
    ratings = 400.0 * theta / math.log(10.0)
    ratings += anchor - ratings.mean()
    return {p: float(ratings[index[p]]) for p in players}


METHODS: dict[str, Callable[[Sequence[Game]], dict[str, float]]] = {
    "bradley_terry": elo_bradley_terry,
    "sequential": elo_sequential,
}
"""Rating methods :func:`bootstrap_elo` can resample."""


def bootstrap_elo(games: Sequence[Game], *, samples: int = 1000, seed: int = 0, confidence: float = 0.95,
                  method: str = "bradley_terry", by_prompt: bool = False) -> dict[str, dict[str, float]]:
    """``{player: {"elo": point estimate on all games, "low": ..., "high": ...}}``.

    ``low`` / ``high`` are the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles (linear
    interpolation) of the player's rating over ``samples`` resamplings with replacement
    (``numpy.random.default_rng(seed)``: the same seed gives the same interval) of the games, or with
    ``by_prompt`` of the prompts, each drawn prompt bringing all its games (a cluster bootstrap: the games of
    one prompt share its difficulty and its samples, so they are not independent, and resampling them one by
    one makes the interval too narrow). A resampling in which a player plays no game gives no rating for it.
    """
    if method not in METHODS:
        raise ValueError(f"bootstrap_elo: method must be one of {sorted(METHODS)}, got {method!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"bootstrap_elo: samples must be a positive int, got {samples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_elo: confidence must be in (0, 1), got {confidence!r}")
    rate = METHODS[method]
    games = list(games)
    point = rate(games)
    draws: dict[str, list[float]] = {p: [] for p in point}
    rng = np.random.default_rng(seed)
    clusters: dict[str, list[Game]] = {}
    for g in games:
        clusters.setdefault(g.prompt if by_prompt else str(len(clusters)), []).append(g)
    units = list(clusters.values())
    for _ in range(samples):
        resampled = [g for i in rng.integers(0, len(units), size=len(units)) for g in units[i]]
        for p, r in rate(resampled).items():
            draws[p].append(r)
    lo, hi = 100.0 * (1.0 - confidence) / 2.0, 100.0 * (1.0 + confidence) / 2.0
    return {p: {"elo": point[p], "low": float(np.percentile(draws[p], lo)), "high": float(np.percentile(draws[p], hi))}
            for p in point}


def probe_readings(run: Path) -> dict[tuple[int, str], float] | None:
    """``{(index, caption): judge_score}`` of a run's ``samples/heldout.json`` (records whose :func:`judge_score`
    is None left out); None when the file is missing or no record has a score."""
    path = Path(run) / "samples" / "heldout.json"
    if not path.is_file():
        return None
    records = json.loads(path.read_text()).get("samples", [])
    scores = {(i, str(r.get("caption", ""))): score for i, r in enumerate(records)
              if (score := judge_score(r)) is not None}
    return scores or None


def judge_score(record: Mapping) -> float | None:
    """The score the judge compares for one held-out record: for a storyboard (its probe reading has
    ``"transitions"``), :func:`~mmgrow.evaluation.video_metrics.storyboard_score` of the reading, so runs
    sampled before that rule changed are judged by the current one; otherwise the record's ``probe_score``."""
    from mmgrow.evaluation.video_metrics import storyboard_score

    reading = record.get("probe")
    if isinstance(reading, Mapping) and "transitions" in reading:
        return storyboard_score(reading)
    score = record.get("probe_score")
    return None if score is None else float(score)


def probe_games(groups: Mapping[str, Sequence[Path]]) -> list[Game]:
    """The automatic judge. ``groups``: variant name -> its run directories (seeds).

    Reads each run's ``samples/heldout.json``; a run without probe readings is left out. A prompt is a
    held-out sample index with its caption; the prompts compared are those that *every* remaining run sampled
    with a probe score. For each such prompt, every pair of runs from different variants gives one
    :class:`Game`: the higher ``probe_score`` wins, equal scores tie. Games are listed with ``a`` the variant
    whose name sorts first, in the order (prompt, variant pair, runs), so the result does not depend on the
    order of ``groups`` (``prompt`` is ``"<index>:<caption>"``).
    """
    runs = [(variant, readings) for variant in sorted(groups) for run in sorted(map(str, groups[variant]))
            if (readings := probe_readings(Path(run))) is not None]
    if len({v for v, _ in runs}) < 2:
        return []
    prompts = sorted(set.intersection(*(set(r) for _, r in runs)))
    games = []
    for prompt in prompts:
        for x, (va, ra) in enumerate(runs):
            for vb, rb in runs[x + 1:]:
                if va == vb:
                    continue
                sa, sb = ra[prompt], rb[prompt]
                games.append(Game(va, vb, 1.0 if sa > sb else 0.0 if sa < sb else 0.5, f"{prompt[0]}:{prompt[1]}"))
    return games


def win_table(games: Sequence[Game]) -> dict[str, dict[str, list[int]]]:
    """``{player: {other: [wins, ties, losses]}}`` from ``player``'s side."""
    table: dict[str, dict[str, list[int]]] = {p: {} for p in players_of(games)}
    for g in games:
        outcome = 0 if g.score > 0.5 else 1 if g.score == 0.5 else 2
        table[g.a].setdefault(g.b, [0, 0, 0])[outcome] += 1
        table[g.b].setdefault(g.a, [0, 0, 0])[2 - outcome] += 1
    return table


def pairwise_elo(groups: Mapping[str, Sequence[Path]], *, samples: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """The automatic pairwise Elo of variants from their runs' held-out samples::

        {"method": "bradley_terry", "judge": "attribute probe (automatic stand-in for human Elo)",
         "games": int, "prompts": int, "ratings": {variant: {"elo", "low", "high"}},
         "wins": {variant: {other: [w, t, l]}}}

    (:func:`probe_games`, :func:`elo_bradley_terry` with its one-virtual-tie prior, :func:`bootstrap_elo`
    with 95 % intervals resampling prompts, ``by_prompt``); None when fewer than two variants have comparable
    probe readings.
    """
    games = probe_games(groups)
    if len(players_of(games)) < 2:
        return None
    return {"method": "bradley_terry", "judge": JUDGE, "games": len(games),
            "prompts": len({g.prompt for g in games}),
            "ratings": bootstrap_elo(games, samples=samples, seed=seed, by_prompt=True),
            "interval": "95 % bootstrap over prompts", "wins": win_table(games)}
