"""Elo ratings (mmgrow.evaluation.elo) against hand computations and closed forms, and the probe judge."""

from __future__ import annotations

import json
import math

import pytest

from mmgrow.evaluation.elo import (
    Game,
    bootstrap_elo,
    elo_bradley_terry,
    elo_sequential,
    pairwise_elo,
    probe_games,
    win_table,
)


def test_sequential_elo_three_games_by_hand():
    # k = 32, everyone starts at 1000.
    # 1) A beats B: E_A = 1/(1+10^0) = 0.5, delta = 32 * 0.5 = 16          -> A 1016, B 984
    # 2) B ties C: E_B = 1/(1+10^(16/400)) = 1/(1+1.0964782) = 0.4769904,
    #    delta = 32 * (0.5 - 0.4769904) = 0.7363068                       -> B 984.7363068, C 999.2636932
    # 3) C beats A: E_C = 1/(1+10^((1016-999.2636932)/400)) = 0.4759331,
    #    delta = 32 * (1 - 0.4759331) = 16.7701398                        -> C 1016.0338330, A 999.2298602
    games = [Game("A", "B", 1.0), Game("B", "C", 0.5), Game("C", "A", 1.0)]
    r = elo_sequential(games)
    assert r["A"] == pytest.approx(999.2298602, abs=1e-6)
    assert r["B"] == pytest.approx(984.7363068, abs=1e-6)
    assert r["C"] == pytest.approx(1016.0338330, abs=1e-6)
    assert sum(r.values()) == pytest.approx(3000.0)  # Elo is zero-sum


def test_bradley_terry_two_players_closed_form():
    # 7 wins, 3 losses: share w = 0.7, difference 400 log10(0.7/0.3) = 147.19 points, centred on the anchor
    games = [Game("A", "B", 1.0)] * 7 + [Game("A", "B", 0.0)] * 3
    r = elo_bradley_terry(games, prior=0.0)
    diff = 400 * math.log10(0.7 / 0.3)
    assert r["A"] - r["B"] == pytest.approx(diff, abs=1e-7)
    assert r["A"] == pytest.approx(1000 + diff / 2, abs=1e-7)
    # the same share made of ties (5 wins, 4 ties, 1 loss: w = (5 + 2) / 10) gives the same ratings, from
    # either side of the games
    tied = [Game("A", "B", 1.0)] * 5 + [Game("B", "A", 0.5)] * 4 + [Game("B", "A", 1.0)]
    r2 = elo_bradley_terry(tied, prior=0.0, anchor=1500.0)
    assert r2["A"] - r2["B"] == pytest.approx(diff, abs=1e-7)
    assert (r2["A"] + r2["B"]) / 2 == pytest.approx(1500.0)


def test_bradley_terry_three_players_satisfy_the_likelihood_equations():
    games = ([Game("A", "B", 1.0)] * 3 + [Game("B", "A", 1.0)] + [Game("B", "C", 1.0)] * 2 + [Game("C", "B", 0.5)] * 2
             + [Game("C", "A", 1.0), Game("C", "A", 0.0), Game("A", "C", 1.0), Game("A", "C", 0.5)])
    r = elo_bradley_terry(games, prior=0.0)
    for player in "ABC":
        actual = sum(g.score if g.a == player else 1 - g.score for g in games if player in (g.a, g.b))
        expected = sum(1 / (1 + 10 ** ((r[g.b if g.a == player else g.a] - r[player]) / 400))
                       for g in games if player in (g.a, g.b))
        assert expected == pytest.approx(actual, abs=1e-8)
    assert sum(r.values()) / 3 == pytest.approx(1000.0)
    # order-independent: the games reversed give the same ratings
    assert elo_bradley_terry(games[::-1], prior=0.0) == pytest.approx(r, abs=1e-8)


def test_bradley_terry_prior_keeps_an_unbeaten_player_finite():
    games = [Game("A", "B", 1.0)] * 3
    with pytest.raises(ValueError, match="do not exist"):
        elo_bradley_terry(games, prior=0.0)
    strong, weak = elo_bradley_terry(games, prior=1.0), elo_bradley_terry(games, prior=0.1)
    assert all(math.isfinite(v) for v in strong.values())
    # the prior shrinks: more virtual ties, a smaller gap
    assert 0 < strong["A"] - strong["B"] < weak["A"] - weak["B"]
    # with prior p against a virtual player of strength 1 and symmetric results the strengths are g and 1/g:
    # A's equation 3 g/(g+1/g) + p g/(g+1) = 3 + p/2 -- check it holds for p = 1
    g = 10 ** ((strong["A"] - 1000) / 400)
    assert 3 * g / (g + 1 / g) + g / (g + 1) == pytest.approx(3.5, abs=1e-8)


def test_bootstrap_contains_point_and_narrows_with_more_games():
    base = [Game("A", "B", 1.0)] * 6 + [Game("A", "B", 0.5)] * 2 + [Game("A", "B", 0.0)] * 2 + \
           [Game("B", "C", 1.0)] * 5 + [Game("B", "C", 0.0)] * 5
    few = bootstrap_elo(base, samples=300, seed=1)
    many = bootstrap_elo(base * 4, samples=300, seed=1)
    for p in "ABC":
        assert few[p]["low"] <= few[p]["elo"] <= few[p]["high"]
        assert many[p]["low"] <= many[p]["elo"] <= many[p]["high"]
        assert many[p]["high"] - many[p]["low"] < few[p]["high"] - few[p]["low"]
    assert bootstrap_elo(base, samples=300, seed=1) == few  # a fixed seed reproduces the interval
    assert few["A"]["elo"] == elo_bradley_terry(base)["A"]


def test_bootstrap_by_prompt_resamples_whole_prompts():
    # one game per prompt: resampling prompts is resampling games (the same draws, the same interval)
    single = [Game("A", "B", x, prompt=f"p{i}") for i, x in enumerate([1.0, 1.0, 0.5, 0.0, 1.0, 0.0, 1.0, 0.5])]
    assert bootstrap_elo(single, samples=200, seed=3, by_prompt=True) == bootstrap_elo(single, samples=200, seed=3)
    # ten identical games per prompt (perfectly dependent): per-game resampling behaves as if there were 80
    # independent games; per-prompt resampling sees 8 prompts, so its interval is wider
    clustered = [Game(g.a, g.b, g.score, prompt=g.prompt) for g in single for _ in range(10)]
    games = bootstrap_elo(clustered, samples=300, seed=3)["A"]
    prompts = bootstrap_elo(clustered, samples=300, seed=3, by_prompt=True)["A"]
    assert games["elo"] == prompts["elo"]
    assert prompts["high"] - prompts["low"] > 2 * (games["high"] - games["low"])


def _heldout(root, variant, seed, scores, captions=("red square", "blue circle", "green triangle", "extra")):
    run = root / variant / f"seed{seed}"
    (run / "samples").mkdir(parents=True)
    records = [{"caption": c, "probe_score": s} for c, s in zip(captions, scores)]
    (run / "samples" / "heldout.json").write_text(json.dumps({"samples": records}))
    return run


@pytest.fixture
def groups(tmp_path):
    # prompt:        0    1    2   (3 only in ttt seed1: not sampled by every run -> not compared)
    ttt = [_heldout(tmp_path, "ttt", 0, [1.0, 0.5, 0.0]), _heldout(tmp_path, "ttt", 1, [1.0, 1.0, 0.5, 1.0])]
    swa = [_heldout(tmp_path, "swa", 0, [0.5, 0.5, 0.5]), _heldout(tmp_path, "swa", 1, [0.0, 0.5, 1.0])]
    no_probe = tmp_path / "swa" / "seed2"
    (no_probe / "samples").mkdir(parents=True)
    (no_probe / "samples" / "heldout.json").write_text(json.dumps({"samples": [{"caption": "red square"}]}))
    return {"ttt": ttt, "swa": swa + [no_probe, tmp_path / "missing"]}


def test_probe_games_on_fixture_runs(groups):
    games = probe_games(groups)
    # a = "swa" (sorts first); runs paired (swa0, ttt0), (swa0, ttt1), (swa1, ttt0), (swa1, ttt1) per prompt
    # prompt 0: swa 0.5/0.0 vs ttt 1.0/1.0 -> four losses; prompt 1: 0.5/0.5 vs 0.5/1.0 -> tie, loss, tie, loss;
    # prompt 2: 0.5/1.0 vs 0.0/0.5 -> win, tie, win, win
    assert [g.score for g in games] == [0, 0, 0, 0, 0.5, 0, 0.5, 0, 1, 0.5, 1, 1]
    assert all((g.a, g.b) == ("swa", "ttt") for g in games)
    assert [g.prompt for g in games[::4]] == ["0:red square", "1:blue circle", "2:green triangle"]
    assert win_table(games) == {"swa": {"ttt": [3, 3, 6]}, "ttt": {"swa": [6, 3, 3]}}


def test_judge_is_order_independent(groups):
    reordered = {k: list(reversed(v)) for k, v in reversed(list(groups.items()))}
    assert probe_games(reordered) == probe_games(groups)


def test_pairwise_elo_on_fixture_runs(groups):
    out = pairwise_elo(groups, samples=200, seed=0)
    assert out["games"] == 12 and out["prompts"] == 3
    assert out["method"] == "bradley_terry" and "automatic stand-in" in out["judge"]
    games = probe_games(groups)
    assert out["ratings"]["ttt"]["elo"] == pytest.approx(elo_bradley_terry(games)["ttt"])
    assert out["ratings"]["ttt"]["elo"] > 1000 > out["ratings"]["swa"]["elo"]
    assert out["wins"]["ttt"]["swa"] == [6, 3, 3]
    assert pairwise_elo({"ttt": groups["ttt"]}) is None  # one variant: nothing to compare
    assert pairwise_elo({"ttt": groups["ttt"], "none": groups["swa"][2:]}) is None  # no readings on one side


def test_game_rejects_bad_scores():
    with pytest.raises(ValueError, match="score must be in"):
        Game("A", "B", 1.5)
    with pytest.raises(ValueError, match="cannot play itself"):
        Game("A", "A", 1.0)
