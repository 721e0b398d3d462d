"""Sampling media from a trained model: the shared machinery of the sample callbacks and ``mmgrow generate``.

A request is a list of :class:`~mmgrow.protocols.Segment` s as a task builds them, with placeholders
(e.g. an all-black video of the wanted length) as the raw items of the *target* segments: they fix
how many tokens or latents each target gets. Then

* **continuous targets** (a latent video codec; the ``flow_matching`` objective): the whole sequence
  is built once, every target latent starts as noise and the objective's ODE sampler integrates them
  jointly (Euler / Heun, classifier-free guidance); each target is decoded by its codec;
* **a discrete target** (pixel / VQ tokens; the autoregressive objective): the segments before it
  are the prompt, followed by the codec's ``generation_prefix``; tokens are sampled one by one
  (with the codec's ``generation_constraint`` when it has one), cut at ``generation_length`` and decoded.

No special-token or codec names appear here: codecs declare their kind and structure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmgrow.data.collate import attach_condition, pad_collate
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.protocols import Objective, Segment

log = logging.getLogger(__name__)


@dataclass
class SamplerSettings:
    """How to sample. ``steps``, ``solver``, ``guidance``: the flow-matching ODE sampler; ``greedy``,
    ``temperature``, ``top_k``: token sampling; ``seed`` seeds both."""

    steps: int = 25
    solver: str = "euler"
    guidance: float = 1.0
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0


def sample_continuous(model: nn.Module, objective: Objective, builder: SequenceBuilder, segments: list[Segment], *,
                      condition_text: str | None = None, condition_encoder: Any = None,
                      settings: SamplerSettings | None = None) -> list[Any]:
    """Decoded raw items of every target segment, sampled jointly by the objective's ODE sampler."""
    settings = settings or SamplerSettings()
    targets = [i for i, s in enumerate(segments) if s.role == "target"]
    if not targets:
        raise ValueError("sample_continuous: no target segment to generate")
    for i in targets:
        if builder.codecs[segments[i].modality].kind != "continuous":
            raise ValueError(f"sample_continuous: target segment {i} ({segments[i].modality}) has a discrete codec; "
                             "continuous sampling needs continuous targets")
    if not getattr(objective, "samples_latents", False):
        raise TypeError(f"{type(objective).__name__} cannot sample continuous latents; train with an objective that "
                        "does (samples_latents = True, e.g. flow_matching)")
    device = next(model.parameters()).device
    seq, spans = builder.build_with_spans(segments)
    batch = pad_collate([seq])
    if condition_encoder is not None and condition_text is not None:
        batch = attach_condition(batch, [condition_text], condition_encoder)
    batch = batch.to(device)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    latents = objective.generate(model, batch, steps=settings.steps, solver=settings.solver,
                                 guidance=settings.guidance, generator=generator)[0].float().cpu()
    out = []
    for i in targets:
        codec = builder.codecs[segments[i].modality]
        out.append(codec.decode(latents[spans[i], : codec.latent_dim]))
    return out


def sample_discrete(model: nn.Module, objective: Objective, builder: SequenceBuilder, prompt: list[Segment],
                    modality: str, max_new_tokens: int, *, constraint: Any = None, condition_text: str | None = None,
                    condition_encoder: Any = None, settings: SamplerSettings | None = None) -> Any:
    """One decoded item of ``modality`` sampled token by token after the ``prompt`` segments."""
    return sample_discrete_batch(model, objective, builder, [prompt], modality, [max_new_tokens],
                                 constraint=constraint, condition_texts=[condition_text],
                                 condition_encoder=condition_encoder, settings=settings)[0]


def sample_discrete_batch(model: nn.Module, objective: Objective, builder: SequenceBuilder,
                          prompts: list[list[Segment]], modality: str, max_new_tokens: list[int], *,
                          constraint: Any = None, condition_texts: list[str | None] | None = None,
                          condition_encoder: Any = None, settings: SamplerSettings | None = None,
                          encoded: list[Any] | None = None) -> list[Any]:
    """:func:`sample_discrete` for several prompts whose sequences have the same length, as one batch.

    Row ``b`` is cut to its own ``max_new_tokens[b]`` (the batch decodes the longest), then at the codec's
    ``generation_length``: each row's tokens are those it would get alone (rows never interact; the
    model runs ``[B, T]`` without padding). A condition encoder needs a condition text for every row.
    ``encoded``: the prompts' ``builder.build`` results when the caller has them already.
    """
    settings = settings or SamplerSettings()
    if len(max_new_tokens) != len(prompts) or not prompts:
        raise ValueError(f"sample_discrete_batch: {len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    codec = builder.codecs[modality]
    device = next(model.parameters()).device
    space = model.token_space
    prefix = codec.generation_prefix()
    seqs = encoded if encoded is not None else [builder.build(p) for p in prompts]
    if len({len(q) for q in seqs}) != 1:
        raise ValueError(f"sample_discrete_batch: the prompts encode to different lengths {sorted({len(q) for q in seqs})}; "
                         "batch prompts of one length (there is no padding)")
    ids = torch.stack([torch.cat([q.input_ids, space.to_global(prefix, modality)]) for q in seqs]).to(device)
    extra: dict[str, torch.Tensor] = {}
    texts = list(condition_texts or [None] * len(prompts))
    if condition_encoder is not None and any(t is not None for t in texts):
        if any(t is None for t in texts):
            raise ValueError("sample_discrete_batch: with a condition encoder every prompt needs a condition text")
        emb, mask = condition_encoder.encode(texts)
        extra = {"condition": emb.to(device), "condition_mask": mask.to(device)}
    if seqs[0].latents is not None:  # continuous inputs (image / audio features); the prefix ids are discrete
        pad = seqs[0].latents.new_zeros(len(prefix), seqs[0].latents.shape[1])
        extra["latents"] = torch.stack([torch.cat([q.latents, pad]) for q in seqs]).to(device)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    new = objective.generate(model, ids, modality=modality, max_new_tokens=max(max_new_tokens), greedy=settings.greedy,
                             temperature=settings.temperature, top_k=settings.top_k, constraint=constraint,
                             generator=generator, **extra).cpu()
    out = []
    for row, budget in zip(new, max_new_tokens):
        row = row[:budget]
        out.append(codec.decode(torch.cat([prefix, row[: codec.generation_length(row)]])))
    return out


def write_video_files(frames: Any, stem: str | Path, fps: float = 4) -> list[Path]:
    """``stem.gif`` and, when PyAV is installed (the ``video`` extra), ``stem.mp4`` of ``uint8 [F, H, W, 3]``
    frames, upscaled so small frames stay visible (8x up to 32 px, then 4x, 2x ...)."""
    from mmgrow.evaluation.media import write_gif, write_mp4

    stem = Path(stem)
    scale = max(1, 256 // max(int(frames.shape[1]), 1))
    files = [write_gif(frames, stem.with_suffix(".gif"), fps=fps, scale=min(scale, 8))]
    try:
        files.append(write_mp4(frames, stem.with_suffix(".mp4"), fps=fps, scale=min(scale, 8)))
    except ImportError as exc:
        log.warning("no MP4 written: %s", exc)
    return files
