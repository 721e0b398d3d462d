"""Generated samples for held-out prompts: videos for captions, captions for videos.

Both callbacks run at the end of ``fit`` on global rank 0 and only when a task of the data module
targets their modality (``Task.target_modalities``). A prompt is the input item's tokens followed by
the generated codec's ``generation_prefix()`` (``bov`` for video, ``bos`` for text); sampling uses
the objective's ``generate`` and, for video, the codec's ``generation_constraint``; the sampled
tokens are cut with the codec's ``generation_length`` and decoded. No special-token names appear
here: the codecs declare them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from mmgrow.protocols import Sample, Segment
from mmgrow.rundir import atomic_write_bytes
from mmgrow.training.generation import SamplerSettings, sample_continuous, sample_discrete, write_video_files
from mmgrow.training.rank_zero import model_on_rank_zero

log = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "sample"


def match_rates(records: list[dict]) -> dict[str, float]:
    """Fraction of samples whose generated item shows what was asked, per attribute."""
    keys = sorted({k for r in records for k in r.get("match", {})})
    return {k: sum(r["match"][k] for r in records) / len(records) for k in keys}


class _HeldOutSampler(pl.Callback):
    """Shared sampling machinery; subclasses say what is generated and how it is written."""

    modality = ""

    def __init__(self, num_samples: int, greedy: bool, temperature: float, top_k: int | None, seed: int) -> None:
        self.num_samples = num_samples
        self.greedy, self.temperature, self.top_k, self.seed = greedy, temperature, top_k, seed

    def active(self, trainer: pl.Trainer) -> bool:
        """Rank 0, samples asked for, a task targeting the modality, its codec present, and an objective
        that can sample it: a discrete codec needs ``objective.samples_tokens`` (default True; flow
        matching has no token sampler, so its runs write no captions instead of crashing at fit end)."""
        dm = trainer.datamodule
        targets = {m for task in getattr(dm, "tasks", []) for m in getattr(task, "target_modalities", ())}
        codec = getattr(dm, "codecs", {}).get(self.modality)
        if not (trainer.is_global_zero and self.num_samples > 0 and self.modality in targets and codec is not None):
            return False
        objective = getattr(trainer.lightning_module, "objective", None)
        if codec.kind == "discrete" and not getattr(objective, "samples_tokens", True):
            log.info("%s: skipped, the objective %s samples no %s tokens", type(self).__name__,
                     type(objective).__name__, self.modality)
            return False
        return True

    def settings(self) -> SamplerSettings:
        return SamplerSettings(greedy=self.greedy, temperature=self.temperature, top_k=self.top_k, seed=self.seed)

    def sample(self, pl_module: pl.LightningModule, dm: Any, prompt_segment: Segment, max_new_tokens: int,
               constraint: Any = None) -> Any:
        """Generate one item of ``self.modality`` after ``prompt_segment``; returns the decoded item."""
        text = prompt_segment.raw if prompt_segment.modality == "text" else None  # the prompt's text, as in training
        return sample_discrete(model_on_rank_zero(pl_module), pl_module.objective, dm.builder, [prompt_segment], self.modality,
                               max_new_tokens, constraint=constraint, condition_text=text,
                               condition_encoder=getattr(dm, "condition_encoder", None), settings=self.settings())


class GenerateSamples(_HeldOutSampler):
    """Videos for the held-out captions: ``samples/NN_<caption>.gif``, ``heldout.png``, ``heldout.json``.

    Args:
        num_samples: how many held-out captions (in the dataset's order).
        greedy, temperature, top_k: sampler settings. Sampling, not greedy, by default: where the
            data places a shape at random, no single cell is likely to hold it, so greedy decoding
            of the first frame picks the background everywhere and draws an empty video.
        seed: seeds sampling.

    ``heldout.json`` holds, per sample, the asked attributes and, when the dataset can read a video
    back (``dataset.describe(frames)``), what the generated video shows, with match rates.

    With a continuous video codec (a DiT trained with ``flow_matching``) the held-out split's samples are
    the prompts: each is turned into segments by the first task that targets video, its video replaced
    by a black placeholder of the same size, and sampled with the ODE sampler (``steps``, ``solver``,
    ``guidance``); an MP4 is written next to each GIF when PyAV is installed. With ``probe`` (a directory
    of :func:`~mmgrow.evaluation.probe.load_probe` weights, e.g. ``pretrained/shapes_probe``) each record
    also holds what the attribute probe sees and its ``probe_score`` (what the automatic Elo judge compares),
    and ``heldout.json``'s ``"probe"`` the text alignment or, for storyboards, scene consistency
    (:mod:`mmgrow.evaluation.video_metrics`) and the Fréchet distance of the real against the generated
    clips (:func:`probe_scores`; meaningful from ``num_samples`` giving more clips than the probe's 64
    features).
    """

    modality = "video"

    def __init__(self, num_samples: int = 4, greedy: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0, steps: int = 25, solver: str = "euler",
                 guidance: float = 1.0, probe: str | None = None) -> None:
        super().__init__(num_samples, greedy, temperature, top_k, seed)
        self.steps, self.solver, self.guidance = steps, solver, guidance
        self.probe = probe

    def settings(self) -> SamplerSettings:
        return SamplerSettings(steps=self.steps, solver=self.solver, guidance=self.guidance, greedy=self.greedy,
                               temperature=self.temperature, top_k=self.top_k, seed=self.seed)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model_on_rank_zero(pl_module)  # every rank: under FSDP / tensor parallelism the gather is a collective
        if not self.active(trainer):
            return
        if trainer.datamodule.codecs[self.modality].kind == "continuous":
            self.sample_latent_videos(trainer, pl_module)
            return
        from mmgrow.evaluation.media import frames_grid_png, write_gif

        dm = trainer.datamodule
        codec = dm.codecs[self.modality]
        train_set = _split(dm, "train", self.modality)  # the source that generates this modality
        num_frames = int(train_set[0].media[self.modality].shape[0])
        constraint_fn = getattr(codec, "generation_constraint", None)
        constraint = constraint_fn(num_frames) if callable(constraint_fn) else None
        max_new = codec.num_tokens(num_frames) - len(codec.generation_prefix())
        describe = getattr(train_set, "describe", None)  # datasets that can read a video back
        out = Path(trainer.default_root_dir) / "samples"
        videos, captions, records = [], [], []
        prompts = dm.heldout_prompts(self.modality) if hasattr(dm, "source_for") else dm.heldout_prompts()
        for i, (caption, meta) in enumerate(prompts[: self.num_samples]):
            frames = self.sample(pl_module, dm, Segment("text", caption, "input"), max_new, constraint)
            path = write_gif(frames, out / f"{i:02d}_{_slug(caption)}.gif")
            videos.append(frames)
            captions.append(caption)
            record = {"caption": caption, "gif": path.name, "asked": dict(meta)}
            if callable(describe):
                record["seen"] = describe(frames)
                record["match"] = {k: record["seen"].get(k) == v for k, v in meta.items()}
            records.append(record)
        if videos:
            frames_grid_png(videos, captions, out / "heldout.png")
            atomic_write_bytes(out / "heldout.json", json.dumps(
                {"samples": records, "match_rate": match_rates(records)}, indent=2).encode())
            log.info("samples written to %s", out)


    def sample_latent_videos(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Continuous codecs: jointly sampled latents for held-out samples (class docstring)."""
        from mmgrow.evaluation.media import frames_grid_png

        dm = trainer.datamodule
        task = next(t for t in dm.tasks if self.modality in t.target_modalities)
        describe = getattr(_split(dm, "train", self.modality), "describe", None)
        out = Path(trainer.default_root_dir) / "samples"
        videos, captions, records = [], [], []
        test_set = _split(dm, "heldout", self.modality)
        examples = [test_set[i] for i in range(min(self.num_samples, len(test_set)))]
        for i, real in enumerate(examples):
            video = generate_video(model_on_rank_zero(pl_module), pl_module.objective, dm.builder, task, real, self.modality,
                                   getattr(dm, "condition_encoder", None), self.settings())
            files = write_video_files(video, out / f"{i:02d}_{_slug(real.text)}")
            videos.append(video)
            captions.append(real.text)
            record = {"caption": real.text, "files": [f.name for f in files], "asked": dict(real.meta)}
            flat = {k: v for k, v in real.meta.items() if isinstance(v, str)}
            if callable(describe) and flat:
                record["seen"] = describe(video)
                record["match"] = {k: record["seen"].get(k) == v for k, v in flat.items()}
            records.append(record)
        if videos:
            frames_grid_png(videos, captions, out / "heldout.png")
            rates = match_rates([r for r in records if "match" in r]) if any("match" in r for r in records) else {}
            summary = {"samples": records, "match_rate": rates}
            if self.probe is not None:
                summary["probe"] = probe_scores(self.probe, videos, examples, records)
            atomic_write_bytes(out / "heldout.json", json.dumps(summary, indent=2).encode())
            log.info("samples written to %s", out)


def probe_scores(probe: Any, videos: list[torch.Tensor], examples: list[Sample], records: list[dict]) -> dict:
    """Attribute-probe scores of generated ``videos`` (``uint8 [F, H, W, 3]`` each) for the ``examples`` they were
    asked from. ``probe``: an :class:`~mmgrow.evaluation.probe.AttributeProbe` or the directory of one.

    Returns ``heldout.json``'s ``"probe"``: ``"text_alignment"`` over the single clips, ``"scene_consistency"``
    (the means of :func:`~mmgrow.evaluation.video_metrics.scene_consistency`'s fields) over the storyboards
    (``meta["scenes"]``), and the Fréchet distance between the probe features of the real held-out clips and
    the generated ones (:func:`frechet_clips`): ``"frechet_distance"`` (None with fewer than 2 clips),
    ``"frechet_clips"`` (clips per set) and ``"frechet_features"`` (the feature size ``d``). With ``N <= d``
    clips the covariances are rank-deficient and the distance is biased upwards: compare only distances
    made from equally many clips, and use ``N > d`` (65 clips or storyboard segments for the shipped probe,
    ``d = 64``) for a full-rank estimate.

    Adds to each record its probe reading (``"probe"``) and ``"probe_score"``, the per-sample score the
    automatic Elo judge compares (:func:`mmgrow.evaluation.elo.probe_games`): for a clip, the fraction of the
    attributes asked for (the sample's metadata values under the probe's attribute names) that the probe
    sees; for a storyboard, :func:`~mmgrow.evaluation.video_metrics.storyboard_score` (the mean of its
    scene-consistency ``"score"`` and ``"alignment"``, those not None). Both lie in [0, 1], higher is better.
    """
    from mmgrow.evaluation.probe import load_probe
    from mmgrow.evaluation.video_metrics import frechet_distance, scene_consistency, storyboard_score, text_alignment

    if isinstance(probe, (str, Path)):
        probe = load_probe(probe)
    stories = [i for i, e in enumerate(examples) if "scenes" in e.meta]
    clips = [i for i, e in enumerate(examples) if "scenes" not in e.meta]
    scores: dict[str, Any] = {}
    for i in stories:
        records[i]["probe"] = scene_consistency(videos[i], examples[i].meta["scenes"],
                                                examples[i].meta["segment_frames"], probe)
        records[i]["probe_score"] = storyboard_score(records[i]["probe"])
    if stories:
        means = {}
        for key in ("within_scene", "transitions", "alignment", "score"):
            values = [records[i]["probe"][key] for i in stories if records[i]["probe"].get(key) is not None]
            means[key] = sum(values) / len(values) if values else None  # None: no storyboard had such a check
        scores["scene_consistency"] = means
    if clips:
        stacked = torch.stack([videos[i] for i in clips])
        for i, seen in zip(clips, probe.predict(stacked)):
            records[i]["probe"] = seen
            asked = {k: v for k, v in examples[i].meta.items() if k in probe.labels}
            records[i]["probe_score"] = sum(seen[k] == v for k, v in asked.items()) / len(asked) if asked else None
        scores["text_alignment"] = text_alignment(stacked, [examples[i].meta for i in clips], probe)
    real, fake = frechet_clips(videos, examples)
    scores["frechet_distance"] = frechet_distance(real, fake, probe) if len(real) >= 2 else None
    scores["frechet_clips"] = len(real)
    scores["frechet_features"] = getattr(probe, "num_features", None)
    return scores


def frechet_clips(videos: list[torch.Tensor], examples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """The real (``example.media["video"]``) and generated clips a Fréchet distance compares, ``uint8
    [N, F, H, W, 3]`` each, paired: a single clip is one clip; a storyboard is cut into its segments
    (``meta["segment_frames"]`` frames each), because the probe judges one scene's object and motion at a
    time -- a whole storyboard averages over its scenes -- and segments give more clips for the covariance.
    Only clips of the most frequent shape are kept (clips of different lengths do not stack)."""
    real, fake = [], []
    for video, example in zip(videos, examples):
        truth = example.media["video"]
        step = int(example.meta["segment_frames"]) if "scenes" in example.meta else int(truth.shape[0])
        real += list(truth.split(step))
        fake += list(video.split(step))
    if not real:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)
    shapes = [tuple(c.shape) for c in real]
    common = max(set(shapes), key=shapes.count)
    keep = [i for i, s in enumerate(shapes) if s == common and tuple(fake[i].shape) == s]
    return torch.stack([real[i] for i in keep]), torch.stack([fake[i] for i in keep])


def generate_video(model: Any, objective: Any, builder: Any, task: Any, example: Sample, modality: str,
                   condition_encoder: Any, settings: SamplerSettings) -> torch.Tensor:
    """Sample the ``modality`` targets of ``task.segments`` of ``example`` with its media replaced by a
    black placeholder of the same size; the decoded targets, concatenated along frames."""
    placeholder = Sample(media={modality: torch.zeros_like(example.media[modality])}, text=example.text,
                         meta=example.meta)
    segments = task.segments(placeholder)
    items = sample_continuous(model, objective, builder, segments, condition_text=task.condition_text(placeholder,
                              segments), condition_encoder=condition_encoder, settings=settings)
    return torch.cat([torch.as_tensor(item) for item in items], dim=0)


class GenerateCaptions(_HeldOutSampler):
    """Captions for videos of the held-out combinations: ``samples/captions.json``.

    Per sample: the true caption, the generated one, and whether it is exact and names each asked
    attribute (``meta`` values as words), with match rates. Greedy by default: a caption has one
    right answer.
    """

    modality = "text"

    def __init__(self, num_samples: int = 4, greedy: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0, max_new_tokens: int = 64) -> None:
        super().__init__(num_samples, greedy, temperature, top_k, seed)
        self.max_new_tokens = max_new_tokens

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model_on_rank_zero(pl_module)  # every rank: under FSDP / tensor parallelism the gather is a collective
        if not self.active(trainer) or not hasattr(trainer.datamodule, "test_set"):
            return
        dm = trainer.datamodule
        records = []
        test_set = _split(dm, "heldout", self.modality)  # the held-out split: combinations never trained on
        for i in range(min(self.num_samples, len(test_set))):
            item = test_set[i]
            if "video" not in item.media or "video" not in dm.codecs:  # e.g. text needles: no video to caption
                continue
            text = self.sample(pl_module, dm, Segment("video", item.media["video"], "input"), self.max_new_tokens)
            words = text.split()
            match = {"exact": text == item.text, **{k: str(v) in words for k, v in item.meta.items()}}
            records.append({"caption": item.text, "generated": text, "match": match})
        if records:
            out = Path(trainer.default_root_dir) / "samples" / "captions.json"
            atomic_write_bytes(out, json.dumps({"samples": records, "match_rate": match_rates(records)},
                                               indent=2).encode())
            log.info("captions written to %s", out)


def _split(dm: Any, split: str, modality: str) -> Any:
    """The ``split`` dataset of the data module's source that generates ``modality`` (data modules without
    sources: their ``train_set`` / ``test_set``)."""
    if hasattr(dm, "split_of"):
        return dm.split_of(split, modality)
    return dm.train_set if split == "train" else dm.test_set
