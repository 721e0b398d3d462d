"""The shapes attribute probe (shipped weights, save / load, input contract) and the video metrics
built on it, the Fréchet distance against a float64 eigendecomposition reference."""

from types import SimpleNamespace

import pytest
import torch

from mmgrow.data.synthetic.shapes import ShapesDataset
from mmgrow.data.synthetic.storyboard import StoryboardDataset
from mmgrow.evaluation.probe import ALL_COLOURS, AttributeProbe, load_probe
from mmgrow.evaluation.video_metrics import ProbeFeatures, frechet_distance, scene_consistency, text_alignment
from mmgrow.rundir import CheckpointError

FRESH_SEED = 777  # neither the training seed (0) nor the evaluation seed of benchmarks/train_probe.py (12345)


@pytest.fixture(scope="module")
def probe():
    return load_probe()


def shapes_clips(n, frames, seed, split="val", colours=ALL_COLOURS, **kw):
    ds = ShapesDataset(num_samples=n, frames=frames, seed=seed, split=split, colours=colours, **kw)
    samples = [ds[i] for i in range(n)]
    return torch.stack([s.media["video"] for s in samples]), [s.meta for s in samples]


# ------------------------------------------------------------------------------------------------
# the probe
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split, frames", [("val", 2), ("val", 4), ("heldout", 4), ("heldout", 6)])
def test_shipped_probe_reads_fresh_real_clips(probe, split, frames):
    # Measured by benchmarks/train_probe.py: 1.000 on every attribute, split and length (probe.json).
    clips, metas = shapes_clips(240, frames, FRESH_SEED, split)
    got = probe.predict(clips)
    for attribute in ("shape", "colour", "motion"):
        acc = sum(g[attribute] == m[attribute] for g, m in zip(got, metas)) / len(metas)
        assert acc >= 0.98, (attribute, acc)


def test_shipped_probe_is_frozen_and_knows_every_colour(probe):
    assert not probe.training and not any(p.requires_grad for p in probe.parameters())
    assert probe.labels["colour"] == ALL_COLOURS and probe.num_features == probe.features(
        shapes_clips(2, 3, 0)[0]).shape[-1]


def test_grid_resolution_input_gives_the_same_features(probe):
    clips, _ = shapes_clips(16, 4, FRESH_SEED)
    grid_clips = clips[:, :, ::4, ::4]  # the 8 x 8 cells a pixel codec decodes to
    torch.testing.assert_close(probe.features(grid_clips), probe.features(clips), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    small = AttributeProbe(width=4, hidden=8, colours=["red", "green", "blue"])
    small.save(tmp_path / "p")
    loaded = load_probe(tmp_path / "p")
    assert loaded.config() == small.config() == {"grid": 8, "width": 4, "hidden": 8, "colours": ["red", "green", "blue"]}
    clips, _ = shapes_clips(5, 3, 1, colours=["red", "green", "blue"])
    for k, v in small.eval()(clips).items():
        assert torch.equal(loaded(clips)[k], v)
    with pytest.raises(CheckpointError, match="model.yaml not found"):
        load_probe(tmp_path / "missing")
    (tmp_path / "p" / "model.yaml").write_text("probe: {class_path: mmgrow.Other, init_args: {}}\n")
    with pytest.raises(CheckpointError, match="does not describe an AttributeProbe"):
        load_probe(tmp_path / "p")
    (tmp_path / "p" / "model.yaml").write_text(
        "probe: {class_path: mmgrow.evaluation.probe.AttributeProbe, init_args: {width: 5, hidden: 8}}\n")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_probe(tmp_path / "p")


def test_probe_input_errors():
    probe = AttributeProbe(width=4, hidden=8)
    with pytest.raises(ValueError, match="F >= 2"):
        probe(torch.zeros(1, 1, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 clips"):
        probe(torch.zeros(1, 2, 32, 32, 3))
    with pytest.raises(ValueError, match="not a multiple of grid=8"):
        probe(torch.zeros(1, 2, 30, 30, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="colours must be"):
        AttributeProbe(colours=["red", "black"])


# ------------------------------------------------------------------------------------------------
# text alignment and scene consistency
# ------------------------------------------------------------------------------------------------


class FixedProbe:
    """A stand-in that returns preset predictions, so the metrics' counting is checked exactly."""

    def __init__(self, answers):
        self.labels = {"shape": ("square", "ring"), "colour": ("red", "blue"), "motion": ("left", "up")}
        self.answers = answers

    def predict(self, clips):
        assert len(clips) == len(self.answers)
        return [dict(a) for a in self.answers]


def p(shape, colour, motion="left"):
    return {"shape": shape, "colour": colour, "motion": motion}


def test_text_alignment_counts_exactly():
    stub = FixedProbe([p("square", "red"), p("ring", "red"), p("square", "blue", "up"), p("ring", "blue")])
    asked = [{"shape": "square", "colour": "red", "text": "ignored"}, {"shape": "square", "colour": "blue"},
             {"shape": "square", "motion": "left"}, {"colour": "blue"}]
    got = text_alignment(torch.zeros(4, 2, 8, 8, 3, dtype=torch.uint8), asked, stub)
    # shape asked 3x, right 2x; colour asked 3x, right 2x; motion asked once, wrong; all: clips 0 and 3.
    assert got == {"shape": 2 / 3, "colour": 2 / 3, "motion": 0.0, "all": 0.5}
    with pytest.raises(ValueError, match="cannot recognise"):
        text_alignment(torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8), [{"colour": "green"}], stub)
    with pytest.raises(ValueError, match="2 clips but 1"):
        text_alignment(torch.zeros(2, 2, 8, 8, 3, dtype=torch.uint8), [{"colour": "red"}], stub)
    with pytest.raises(ValueError, match="names none"):
        text_alignment(torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8), [{"size": "big"}], stub)


def test_text_alignment_with_the_probe_on_real_and_mismatched_captions(probe):
    clips, metas = shapes_clips(30, 4, FRESH_SEED)
    assert text_alignment(clips, metas, probe) == {"shape": 1.0, "colour": 1.0, "motion": 1.0, "all": 1.0}
    other = {c: ALL_COLOURS[(ALL_COLOURS.index(c) + 1) % len(ALL_COLOURS)] for c in ALL_COLOURS}
    wrong = [{**m, "colour": other[m["colour"]]} for m in metas]
    assert text_alignment(clips, wrong, probe) == {"shape": 1.0, "colour": 0.0, "motion": 1.0, "all": 0.0}


def test_scene_consistency_counts_exactly():
    board = [{"text": "a", "requires_scene_transition": True, "segments": 2, "shape": "square", "colour": "red"},
             {"text": "b", "requires_scene_transition": False, "segments": 2},
             {"text": "c", "requires_scene_transition": True, "segments": 1},
             {"text": "d", "requires_scene_transition": False, "segments": 1}]
    answers = [p("square", "red"), p("square", "red", "up"),    # scene a: consistent, matches its attributes
               p("ring", "red"), p("ring", "blue"),             # b: object changed inside, changed at the start
               p("square", "blue"),                             # c: changed, as required
               p("square", "blue")]                             # d: kept, as required
    got = scene_consistency(torch.zeros(6 * 2, 8, 8, 3, dtype=torch.uint8), board, 2, FixedProbe(answers))
    assert got["segments"] == answers
    assert got["within_scene"] == 1 / 2        # a yes, b no (c, d have one segment)
    assert got["transitions"] == 2 / 3         # a->b changed but not required; b->c, c->d right
    assert got["alignment"] == 1.0             # only scene a names attributes: 2 segments x 2 attributes
    assert got["score"] == (1 / 2 + 2 / 3) / 2
    single = scene_consistency(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), [{"text": "x"}], 2,
                               FixedProbe([p("ring", "red")]))
    assert single["within_scene"] is None and single["transitions"] is None and single["score"] is None
    with pytest.raises(ValueError, match="need 12 frames, the video has 10"):
        scene_consistency(torch.zeros(10, 8, 8, 3, dtype=torch.uint8), board, 2, FixedProbe(answers))


def test_scene_consistency_with_the_probe_on_dataset_storyboards(probe):
    ds = StoryboardDataset(num_samples=8, seed=FRESH_SEED, split="val", scenes=(2, 3), segments_per_scene=2,
                           segment_frames=2)
    for i in range(len(ds)):
        sample = ds[i]
        got = scene_consistency(sample.media["video"], sample.meta["scenes"], 2, probe)
        assert got["within_scene"] == got["transitions"] == got["alignment"] == got["score"] == 1.0
        # Claiming the opposite flag for every later scene makes every boundary wrong.
        flipped = [dict(s, requires_scene_transition=j == 0 or not s["requires_scene_transition"])
                   for j, s in enumerate(sample.meta["scenes"])]
        assert scene_consistency(sample.media["video"], flipped, 2, probe)["transitions"] == 0.0


# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------


def reference_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """float64 d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the trace of the square root
    from the symmetric form tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)) and eigh (torchmetrics uses eigvals)."""
    a, b = a.double(), b.double()
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * middle)


def test_frechet_distance_matches_a_float64_reference(probe):
    real, _ = shapes_clips(120, 4, FRESH_SEED)
    same_law, _ = shapes_clips(100, 4, FRESH_SEED + 1)
    shifted, _ = shapes_clips(100, 4, FRESH_SEED + 1, colours=["red", "green"], shapes=["square", "bar"])
    feats = {name: probe.features(x) for name, x in (("real", real), ("same", same_law), ("shift", shifted))}
    d_same = frechet_distance(real, same_law, probe, batch_size=64)
    d_shift = frechet_distance(real, shifted, probe)
    ref_same, ref_shift = reference_frechet(feats["real"], feats["same"]), reference_frechet(feats["real"], feats["shift"])
    assert d_same == pytest.approx(ref_same, rel=1e-6)
    assert d_shift == pytest.approx(ref_shift, rel=1e-6)
    assert d_shift > 5 * d_same > 0
    scale = float(torch.cov(feats["real"].double().T).trace())
    assert abs(frechet_distance(real, real, probe)) < 1e-8 * scale


def test_probe_features_follow_the_torchmetrics_contract(probe):
    from torchmetrics.image.fid import FrechetInceptionDistance

    wrapper = ProbeFeatures(probe)
    metric = FrechetInceptionDistance(feature=wrapper)
    assert metric.real_features_sum.shape == (probe.num_features,)
    clips, _ = shapes_clips(3, 4, 0)
    metric.update(clips, real=True)
    assert int(metric.real_features_num_samples) == 3  # one sample per clip
    torch.testing.assert_close(metric.real_features_sum, probe.features(clips).double().sum(0))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(clips[:1], clips, SimpleNamespace())
