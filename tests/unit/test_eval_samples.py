"""Held-out sample records: the per-sample probe score the Elo judge reads and the Fréchet distance of
real against generated clips (mmgrow.training.samples.probe_scores)."""

from __future__ import annotations

import pytest
import torch

from mmgrow.data.synthetic.storyboard import StoryboardDataset
from mmgrow.evaluation import video_metrics
from mmgrow.evaluation.probe import load_probe
from mmgrow.protocols import Sample
from mmgrow.training.samples import frechet_clips, probe_scores


def p(shape, colour, motion="left"):
    return {"shape": shape, "colour": colour, "motion": motion}


class QueuedProbe:
    """Preset predictions, one list per ``predict`` call, so the scores can be counted by hand."""

    num_features = 7

    def __init__(self, *calls):
        self.labels = {"shape": ("square", "ring"), "colour": ("red", "blue"), "motion": ("left", "up")}
        self.calls = list(calls)

    def predict(self, clips):
        answers = self.calls.pop(0)
        assert len(clips) == len(answers)
        return [dict(a) for a in answers]


def video(frames, value):
    return torch.full((frames, 8, 8, 3), value, dtype=torch.uint8)


def test_probe_score_per_record_and_the_clips_the_frechet_distance_compares(monkeypatch):
    board = [{"text": "a", "requires_scene_transition": True, "shape": "square"},
             {"text": "b", "requires_scene_transition": False}]
    examples = [Sample({"video": video(2, 10)}, "red square left", {"shape": "square", "colour": "red",
                                                                    "motion": "left", "text": "ignored"}),
                Sample({"video": video(2, 20)}, "blue ring", {"shape": "ring", "colour": "blue"}),
                Sample({"video": torch.cat([video(2, 30), video(2, 40)])}, "story",
                       {"scenes": board, "segment_frames": 2})]
    generated = [video(2, 1), video(2, 2), torch.cat([video(2, 3), video(2, 4)])]
    clip_answers = [p("square", "blue", "left"), p("ring", "blue", "up")]
    # calls: the storyboard's two segments, then the clips (records), then the clips again (text_alignment)
    probe = QueuedProbe([p("square", "red"), p("ring", "red")], clip_answers, clip_answers)
    seen = {}

    def fake_frechet(real, fake, probe_):
        seen.update(real=real, fake=fake)
        return 1.25

    monkeypatch.setattr(video_metrics, "frechet_distance", fake_frechet)
    records = [{}, {}, {}]
    scores = probe_scores(probe, generated, examples, records)
    # clip 0 asked shape, colour, motion and the probe sees square/blue/left: 2 of 3; clip 1 asked 2, sees both
    assert records[0]["probe_score"] == 2 / 3 and records[1]["probe_score"] == 1.0
    assert records[0]["probe"] == clip_answers[0]
    # storyboard: one boundary, object changed although no transition was asked -> transitions 0; no scene has
    # two segments -> within_scene None; score = transitions = 0. Alignment: the board names only scene 0's
    # shape (square) and the probe sees a square there -> 1/1. The judge's score: mean(0, 1) = 0.5
    assert scores["scene_consistency"]["score"] == 0.0 and scores["scene_consistency"]["alignment"] == 1.0
    assert records[2]["probe_score"] == 0.5
    assert scores["text_alignment"]["all"] == 1 / 2
    # four clips of 2 frames per set: the two clips whole and the storyboard cut into its segments, paired
    assert scores["frechet_distance"] == 1.25 and scores["frechet_clips"] == 4 and scores["frechet_features"] == 7
    assert [int(c[0, 0, 0, 0]) for c in seen["real"]] == [10, 20, 30, 40]
    assert [int(c[0, 0, 0, 0]) for c in seen["fake"]] == [1, 2, 3, 4]


def test_frechet_clips_keep_the_most_common_shape():
    examples = [Sample({"video": video(2, 1)}), Sample({"video": video(4, 2)}), Sample({"video": video(2, 3)})]
    real, fake = frechet_clips([video(2, 5), video(4, 6), video(2, 7)], examples)
    assert real.shape == fake.shape == (2, 2, 8, 8, 3) and real[:, 0, 0, 0, 0].tolist() == [1, 3]


@pytest.fixture(scope="module")
def stories():
    ds = StoryboardDataset(num_samples=6, seed=777, split="val", scenes=(2, 3), segments_per_scene=2,
                           segment_frames=2)
    return [ds[i] for i in range(len(ds))]


def test_real_storyboards_score_one_and_sit_at_frechet_zero(stories):
    probe = load_probe()
    real = [s.media["video"] for s in stories]
    records = [{} for _ in stories]
    scores = probe_scores(probe, real, stories, records)
    # the dataset's own storyboards are perfectly consistent under the shipped probe
    assert [r["probe_score"] for r in records] == [1.0] * len(stories)
    segments = sum(len(s.meta["scenes"]) * 2 for s in stories)
    assert scores["frechet_clips"] == segments and scores["frechet_features"] == 64
    scale = float(torch.cov(probe.features(frechet_clips(real, stories)[0]).double().T).trace())
    assert abs(scores["frechet_distance"]) < 1e-6 * scale
    # black videos: far from the real clips, and exactly the distance of the segment sets
    black = [torch.zeros_like(v) for v in real]
    far = probe_scores(probe, black, stories, [{} for _ in stories])["frechet_distance"]
    real_clips, fake_clips = frechet_clips(black, stories)
    assert far == pytest.approx(video_metrics.frechet_distance(real_clips, fake_clips, probe), rel=1e-9)
    assert far > 1e-3 * scale


def test_storyboard_score_averages_structure_and_alignment_and_the_judge_rescoring_uses_it():
    from mmgrow.evaluation.elo import judge_score
    from mmgrow.evaluation.video_metrics import storyboard_score

    assert storyboard_score({"score": 0.5, "alignment": 0.25}) == 0.375
    assert storyboard_score({"score": None, "alignment": 0.25}) == 0.25
    assert storyboard_score({"score": 1.0, "alignment": None}) == 1.0
    assert storyboard_score({"score": None, "alignment": None}) is None
    # a storyboard record written by an older rule (probe_score = structure score only) is judged by the current one
    old = {"probe": {"transitions": 0.5, "score": 0.5, "alignment": 0.0}, "probe_score": 0.5}
    assert judge_score(old) == 0.25
    assert judge_score({"probe": {"shape": "ring"}, "probe_score": 2 / 3}) == 2 / 3  # a clip: its stored score
    assert judge_score({"probe_score": None}) is None
