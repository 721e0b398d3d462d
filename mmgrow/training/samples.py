"""Generated samples for held-out prompts, written as GIFs (and one PNG grid) into ``samples/``.

The prompt for a video is the caption's text tokens followed by the video codec's *prefix*: the
tokens its ``encode`` puts before the first frame block (for ``pixels`` that is ``bov``). The
prefix is found from the codec's own ``block_ids``, so no special-token names are hard-coded here.
Generation uses the objective's sampler and the codec's ``generation_constraint`` when it has one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from mmgrow.protocols import NO_BLOCK, Segment
from mmgrow.training.export import atomic_write_bytes

log = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "sample"


def match_rates(records: list[dict]) -> dict[str, float]:
    """Fraction of samples whose generated video shows what the caption asked, per attribute."""
    keys = sorted({k for r in records for k in r.get("match", {})})
    return {k: sum(r["match"][k] for r in records) / len(records) for k in keys}


def video_prefix(codec: Any, frame_shape: tuple[int, ...]) -> torch.Tensor:
    """Local ids the codec emits before its first frame block (e.g. ``[bov]``)."""
    blank = torch.zeros((1, *frame_shape), dtype=torch.uint8)
    tokens = codec.encode(blank)
    blocks = codec.block_ids(tokens)
    first = int((blocks != NO_BLOCK).nonzero()[0, 0]) if bool((blocks != NO_BLOCK).any()) else len(tokens)
    return tokens[:first]


class GenerateSamples(pl.Callback):
    """At the end of ``fit``, generate a video for each of the first ``num_samples`` held-out captions.

    Args:
        num_samples: how many held-out captions (in the dataset's order).
        greedy, temperature, top_k: sampler settings. Sampling, not greedy, by default: where the
            data places a shape at random, no single cell is likely to hold it, so greedy decoding
            of the first frame picks the background everywhere and draws an empty video.
        seed: seeds sampling when not greedy.
        modality: the generated modality (its codec must decode tokens to ``uint8 [F, H, W, 3]``).
    """

    def __init__(self, num_samples: int = 4, greedy: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0, modality: str = "video") -> None:
        self.num_samples = num_samples
        self.greedy, self.temperature, self.top_k, self.seed = greedy, temperature, top_k, seed
        self.modality = modality

    def generate(self, pl_module: pl.LightningModule, dm: Any, caption: str, num_frames: int,
                 frame_shape: tuple[int, ...]) -> torch.Tensor:
        codec = dm.codecs[self.modality]
        space = pl_module.model.token_space
        text = dm.builder.build([Segment("text", caption, "input")])
        prefix = video_prefix(codec, frame_shape)
        prompt = torch.cat([text.input_ids, space.to_global(prefix, self.modality)])[None].to(pl_module.device)
        constraint_fn = getattr(codec, "generation_constraint", None)
        constraint = constraint_fn(num_frames) if callable(constraint_fn) else None
        per_frame = codec.tokens_per_frame
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        new = pl_module.objective.generate(
            pl_module.model, prompt, modality=self.modality, max_new_tokens=num_frames * per_frame,
            greedy=self.greedy, temperature=self.temperature, top_k=self.top_k, constraint=constraint,
            generator=gen)
        return codec.decode(torch.cat([prefix.to(new.device), new[0]]).cpu())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.num_samples <= 0:
            return
        dm = trainer.datamodule
        if dm is None or self.modality not in getattr(dm, "codecs", {}) or not hasattr(dm, "heldout_prompts"):
            log.info("GenerateSamples: the datamodule has no %s codec or held-out prompts; nothing to generate",
                     self.modality)
            return
        from mmgrow.evaluation.media import frames_grid_png, write_gif

        example = dm.train_set[0].media[self.modality]
        num_frames, frame_shape = int(example.shape[0]), tuple(example.shape[1:])
        out = Path(trainer.default_root_dir) / "samples"
        describe = getattr(dm.train_set, "describe", None)  # datasets that can read a video back
        videos, captions, records = [], [], []
        for i, (caption, meta) in enumerate(dm.heldout_prompts()[: self.num_samples]):
            frames = self.generate(pl_module, dm, caption, num_frames, frame_shape)
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
