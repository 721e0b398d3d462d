"""``--match-params``: the width search on hand-computed counts, and on a tiny real recipe within tolerance."""

from pathlib import Path

import pytest
import yaml

from mmgrow.ablation.match import _search, default_multiple, format_matching, match_params, short_count
from mmgrow.ablation.variants import AblationSpec

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"


@pytest.mark.parametrize("heads, multiple", [([], 8), ([4], 8), ([3], 9), ([4, 6], 12), ([16], 16), ([5, 2], 10)])
def test_default_multiple_is_the_smallest_multiple_of_the_heads_lcm_from_8(heads, multiple):
    assert default_multiple(heads) == multiple


def test_short_counts():
    assert [short_count(n) for n in (512, 21_408, 1_234_567, 2.5e9)] == ["512", "21.4K", "1.23M", "2.5G"]


def _quadratic(unbuildable=()):
    """N(d) = d^2 + 10 d, with some widths that do not build."""
    def measure(overrides):
        d = overrides["model.dim"]
        return {"error": "no"} if d in unbuildable else {"params": d * d + 10 * d, "value": d, "heads": []}
    return measure


def test_search_lands_on_the_closest_multiple_by_hand():
    # target N(100) = 11000; from d0 = 64 (N = 4736) the first guess is round(64 sqrt(11000/4736) / 8) * 8 = 96:
    # N(96) = 10176 < 11000 < N(104) = 11856, and |10176 - 11000| = 824 < 856, so 96 wins
    start = {"params": 4736, "value": 64}
    assert _search(_quadratic(), {}, "model.dim", start, 11000, 8) == (96, 10176)
    # 96 does not build: the walk steps over it; 104 (856 away) beats 88 (N = 8624, 2376 away)
    assert _search(_quadratic({96}), {}, "model.dim", start, 11000, 8) == (104, 11856)
    # from above: d0 = 200 (N = 42000), target N(40) = 2000: guess round(200 sqrt(2000/42000) / 8) = 5 -> 40, exact
    assert _search(_quadratic(), {}, "model.dim", {"params": 42000, "value": 200}, 2000, 8) == (40, 2000)
    with pytest.raises(ValueError, match="must be a positive integer width"):
        _search(_quadratic(), {}, "model.dim", {"params": 1, "value": None}, 2000, 8)


def test_set_of_the_matched_key_and_bad_tolerances_are_refused():
    spec = AblationSpec(variants={"a": {}, "b": {}}, set={"model.dim": 32})
    with pytest.raises(ValueError, match="--set model.dim=32 fixes it"):
        match_params(QUICK, spec)
    with pytest.raises(ValueError, match=r"--match-tolerance must lie in \(0, 1\)"):
        match_params(QUICK, AblationSpec(variants={"a": {}}), tolerance=0)


MAMBA = {"class_path": "mamba2", "init_args": {"headdim": 4, "d_state": 8}}


@pytest.fixture
def tiny(tmp_path):
    """The quickstart recipe at width 32, depth 1."""
    recipe = yaml.safe_load(QUICK.read_text())
    recipe["model"].update(dim=32, depth=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_two_mixers_are_matched_within_tolerance_on_a_tiny_recipe(tiny):
    """Full attention vs Mamba2 (more parameters per width) at depth 1: Mamba2's width comes down until its
    non-embedding count is within 5 % of attention's; the neighbouring widths are no closer. Sliding-window
    attention has exactly attention's weights, so it keeps the width with a zero gap; a variant that sets the
    width itself is left alone."""
    spec = AblationSpec(variants={"full": {}, "mamba2": {"model.mixer": MAMBA},
                                  "swa": {"model.mixer": {"class_path": "sliding_window", "init_args": {"window": 8}}},
                                  "wide": {"model.dim": 48}},
                        vary={"model.depth": [1]})
    cache: dict = {}
    result = match_params(tiny, spec, multiple=2, tolerance=0.05, cache=cache)
    v = result["variants"]
    target = v["full/depth-1"]["params"]
    m = v["mamba2/depth-1"]
    assert m["from"] == 32 and m["to"] < 32 and m["to"] % 2 == 0 and m["overrides"] == {"model.dim": m["to"]}
    relative = (m["params"] - target) / target
    assert abs(relative) <= 0.05 and m["relative"] == pytest.approx(relative)
    from mmgrow.ablation.match import Measurer

    again = Measurer(tiny, "model.dim", {})
    for d in (m["to"] - 2, m["to"] + 2):  # built afresh: the neighbouring widths are no closer
        n = again({"model.mixer": MAMBA, "model.depth": 1, "model.dim": d})
        assert abs(n["params"] - target) >= abs(m["params"] - target)
    assert v["swa/depth-1"]["params"] == target and v["swa/depth-1"]["to"] == 32
    wide = v["wide/depth-1"]
    assert wide["note"] == "sets model.dim itself: left alone" and wide["overrides"] == {} and wide["to"] == 48
    assert wide["params"] > target
    text = format_matching(result)
    assert f"mamba2/depth-1: model.dim 32 -> {m['to']}: N {short_count(m['params'])} vs target " \
           f"{short_count(target)} ({100 * m['relative']:+.1f} %)" in text
    with pytest.raises(ValueError, match=r"variant 'mamba2/depth-1' cannot reach .* within 0.0%.*--match-best-effort"):
        match_params(tiny, spec, multiple=2, tolerance=1e-6, cache=cache)
    best = match_params(tiny, spec, multiple=2, tolerance=1e-6, best_effort=True, cache=cache)
    assert best["variants"]["mamba2/depth-1"]["to"] == m["to"]
    assert best["variants"]["mamba2/depth-1"]["note"] == "best effort: outside 0.0%"


def test_counts_are_cached_in_the_plan_while_the_base_recipe_is_unchanged(tmp_path, monkeypatch):
    """Fake measurements (N = d^2 for attention, 2 d^2 for the other mixer): the second plan builds nothing, an
    edited base recipe is measured again. Known answer: target N(32) = 1024, 2 d^2 closest at d = 24 (1152)."""
    from mmgrow.ablation import match
    from mmgrow.ablation.cli import make_plan
    from mmgrow.ablation.plan import write_plan

    built = []

    def fake(self, overrides):
        built.append(overrides)
        d = overrides.get("model.dim", 32)
        return {"params": (2 if "model.mixer" in overrides else 1) * d * d, "value": d, "heads": [4]}

    monkeypatch.setattr(match.Measurer, "_measure", fake)
    base = tmp_path / "base.yaml"
    base.write_text("model: {dim: 32}\n")
    spec = AblationSpec(variants={"full": {}, "other": {"model.mixer": "mamba2"}})
    settings = {"key": "model.dim", "multiple": None, "tolerance": 0.2, "best_effort": False}
    out = tmp_path / "abl"
    plan = make_plan(base, spec, out, settings)
    # first guess round(32 sqrt(1024 / 2048) / 8) * 8 = 24 (1152 > 1024), then 16 (512): 24 is closer (+12.5 %)
    assert plan["match"]["variants"]["other"]["to"] == 24 and plan["runs"][1]["overrides"]["model.dim"] == 24
    assert plan["runs"][1]["params"] == 1152 and plan["match"]["variants"]["other"]["multiple"] == 8
    n = len(built)
    write_plan(out, plan)
    assert make_plan(base, spec, out, settings)["runs"] == plan["runs"] and len(built) == n
    base.write_text("model: {dim: 32}  # edited\n")
    make_plan(base, spec, out, settings)
    assert len(built) == 2 * n
