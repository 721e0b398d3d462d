"""Automatic scores for generated toy videos, judged by the shapes attribute probe.

Stand-ins for what the papers measure with people and large pretrained models (TTT-video's human
Elo on text following, motion and scene consistency; CLIP scores; FID / FVD), reduced to what the
toy world has: a shape, a colour and a motion per clip, read by
:class:`~mmgrow.evaluation.probe.AttributeProbe`.

* :func:`text_alignment`: how often the probe sees what the caption asked for.
* :func:`scene_consistency`: whether a storyboard video keeps its object inside a scene and changes
  it exactly at the scene transitions.
* :func:`frechet_distance`: Fréchet distance between Gaussians fitted to the probe's features of
  real and generated clips (FVD-style: one feature vector per whole clip), computed by torchmetrics.

The probe knows only the toy attributes: these numbers say nothing about image quality beyond them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmgrow.data.synthetic.storyboard import parse_storyboard
from mmgrow.evaluation.probe import AttributeProbe

OBJECT = ("shape", "colour")
"""The attributes that identify the object of a scene (motion may change without a transition)."""


def text_alignment(clips: Tensor, asked: Sequence[dict[str, Any]], probe: AttributeProbe) -> dict[str, float]:
    """Fraction of clips in which the probe sees what was asked, per attribute.

    ``clips``: ``uint8 [N, F, H, W, 3]``; ``asked[i]``: the attributes clip ``i`` should show, e.g.
    ``{"shape": "square", "colour": "red", "motion": "left"}`` (other keys are ignored, so sample
    metadata can be passed as is). Returns ``{attribute: matches / clips that name it}`` for each
    attribute named at least once, and ``"all"``: the fraction of clips matching every attribute
    they name.
    """
    if len(asked) != len(clips):
        raise ValueError(f"text_alignment: {len(clips)} clips but {len(asked)} asked attribute dicts")
    named = [{k: v for k, v in a.items() if k in probe.labels} for a in asked]
    for i, a in enumerate(named):
        if not a:
            raise ValueError(f"text_alignment: asked[{i}] names none of the probe's attributes {list(probe.labels)}")
        unknown = {k: v for k, v in a.items() if v not in probe.labels[k]}
        if unknown:
            raise ValueError(f"text_alignment: asked[{i}] has values the probe cannot recognise: {unknown}; "
                             f"it knows {probe.labels}")
    seen = probe.predict(clips)
    hits: dict[str, list[bool]] = {k: [] for k in probe.labels}
    every = []
    for want, got in zip(named, seen):
        for k, v in want.items():
            hits[k].append(got[k] == v)
        every.append(all(got[k] == v for k, v in want.items()))
    out = {k: sum(v) / len(v) for k, v in hits.items() if v}
    out["all"] = sum(every) / len(every)
    return out


def scene_consistency(video: Tensor, scenes: Any, segment_frames: int, probe: AttributeProbe) -> dict[str, Any]:
    """How well a storyboard video follows its scene structure.

    ``video``: ``uint8 [F, H, W, 3]`` with ``F = segments * segment_frames``; ``scenes``: the storyboard
    (:func:`~mmgrow.data.synthetic.storyboard.parse_storyboard`; each scene's ``segments`` says how
    many segments it spans). Every segment is judged by the probe. Returns:

    * ``"segments"``: the probe's ``{"shape", "colour", "motion"}`` per segment;
    * ``"within_scene"``: fraction of scenes with >= 2 segments whose segments all show the same
      object (shape and colour); None when no scene has 2 segments;
    * ``"transitions"``: fraction of scene boundaries where "the object changed" (shape or colour of
      the scene's first segment differs from the previous scene's last) equals the scene's
      ``requires_scene_transition``; None for a single scene;
    * ``"alignment"``: fraction of segments showing their scene's known ``shape`` / ``colour`` /
      ``motion`` (those the storyboard gives); None when it gives none;
    * ``"score"``: the mean of ``within_scene`` and ``transitions`` that are not None (None if both are).
    """
    scenes = parse_storyboard(scenes)
    counts = [s.segments for s in scenes]
    if not isinstance(video, Tensor) or video.dim() != 4:
        raise ValueError(f"scene_consistency: video must be a uint8 tensor [F, H, W, 3], got "
                         f"{tuple(getattr(video, 'shape', ())) or type(video).__name__}")
    if video.shape[0] != sum(counts) * segment_frames:
        raise ValueError(f"scene_consistency: {len(scenes)} scenes with {sum(counts)} segments of {segment_frames} "
                         f"frames need {sum(counts) * segment_frames} frames, the video has {video.shape[0]}")
    predicted = probe.predict(torch.stack(video.split(segment_frames)))
    per_scene, first = [], 0
    for count in counts:
        per_scene.append(predicted[first:first + count])
        first += count

    def obj(p: dict[str, str]) -> tuple[str, ...]:
        return tuple(p[k] for k in OBJECT)

    multi = [segs for segs in per_scene if len(segs) >= 2]
    within = sum(len({obj(p) for p in segs}) == 1 for segs in multi) / len(multi) if multi else None
    boundaries = [(obj(per_scene[s - 1][-1]) != obj(per_scene[s][0])) == scenes[s].requires_scene_transition
                  for s in range(1, len(scenes))]
    transitions = sum(boundaries) / len(boundaries) if boundaries else None
    checks = [p[k] == getattr(scene, k) for scene, segs in zip(scenes, per_scene) for p in segs
              for k in probe.labels if getattr(scene, k) is not None]
    parts = [v for v in (within, transitions) if v is not None]
    return {"segments": predicted, "within_scene": within, "transitions": transitions,
            "alignment": sum(checks) / len(checks) if checks else None,
            "score": sum(parts) / len(parts) if parts else None}


def storyboard_score(reading: dict[str, Any]) -> float | None:
    """One number per storyboard for the automatic Elo judge: the mean of the :func:`scene_consistency`
    reading's ``"score"`` (scene structure) and ``"alignment"`` (each scene shows what its text asks), those
    that are not None; None when both are.

    Why both: the seed paper's human raters averaged text following, motion, aesthetics and temporal
    consistency; the probe can read two of these axes, and with few scenes the structure score alone takes
    only a handful of values (mostly ties between models).
    """
    parts = [reading.get(k) for k in ("score", "alignment")]
    parts = [float(v) for v in parts if v is not None]
    return sum(parts) / len(parts) if parts else None


class ProbeFeatures(nn.Module):
    """The probe's penultimate features as a torchmetrics custom feature extractor.

    torchmetrics' ``FrechetInceptionDistance(feature=module)`` reads ``module.num_features`` (an int)
    for the size of its running sums, calls ``module(imgs)`` in ``update`` expecting ``[N,
    num_features]`` and counts samples by ``imgs.shape[0]``. Here ``imgs`` are whole clips ``uint8
    [N, F, H, W, 3]`` (passed through untouched, since ``normalize=False``) and each clip gives one
    feature vector, as in FVD. Features are returned in float64: torchmetrics accumulates in float64
    and casts its result to the features' dtype, so the distance keeps float64 precision.
    """

    def __init__(self, probe: AttributeProbe) -> None:
        super().__init__()
        self.probe = probe
        self.num_features = int(probe.num_features)

    @torch.no_grad()
    def forward(self, clips: Tensor) -> Tensor:
        was_training = self.probe.training
        self.probe.eval()
        try:
            return self.probe.features(clips).double()
        finally:
            self.probe.train(was_training)


def frechet_distance(real_clips: Tensor, fake_clips: Tensor, probe: AttributeProbe, batch_size: int = 256) -> float:
    """Fréchet distance between probe features of two sets of clips (``uint8 [N, F, H, W, 3]`` each,
    ``N >= 2``; the sets may differ in size)::

        d^2 = |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))

    with ``mu``, ``S`` the mean and (unbiased) covariance of each set's features. 0 for identical
    sets; it grows as the generated clips' attribute statistics drift from the real ones. Fewer clips
    than ``probe.num_features`` give a rank-deficient covariance: the value is then biased upwards,
    so compare distances computed with the same numbers of clips.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, clips in (("real_clips", real_clips), ("fake_clips", fake_clips)):
        if not isinstance(clips, Tensor) or clips.dim() != 5 or clips.shape[0] < 2:
            raise ValueError(f"frechet_distance: {name} must be uint8 [N, F, H, W, 3] with N >= 2, got "
                             f"{tuple(getattr(clips, 'shape', ())) or type(clips).__name__}")
    device = next(probe.parameters()).device  # the metric's float64 sums live next to the features
    metric = FrechetInceptionDistance(feature=ProbeFeatures(probe), normalize=False).to(device)
    for clips, real in ((real_clips, True), (fake_clips, False)):
        for chunk in clips.split(batch_size):
            metric.update(chunk, real=real)
    return float(metric.compute())
