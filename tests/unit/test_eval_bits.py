"""Bits per token: validation logs loss / ln 2 only for objectives whose loss is a likelihood in nats."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmgrow.batch import TokenBatch
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.objectives.flow_matching import FlowMatchingObjective
from mmgrow.protocols import ModelOutput
from mmgrow.training.module import MMGrowModule

SIZES = {"text": 7, "video": 5}


class UniformLogits(nn.Module):
    """Every head returns zero logits: each target costs ln V of its modality's vocabulary."""

    def forward(self, input_ids, ctx=None, **kw):
        hidden = torch.zeros(*input_ids.shape, 2, dtype=torch.float64)
        return ModelOutput(hidden=hidden, logits=lambda h, m: torch.zeros(h.shape[0], SIZES[m], dtype=h.dtype))


def batch() -> TokenBatch:
    # one row: text, text, video, video, video -> targets t = 1 (text) and t = 2, 3, 4 (video)
    ids = torch.tensor([[0, 3, 7 + 1, 7 + 4, 7 + 2]])
    mods = torch.tensor([[0, 0, 1, 1, 1]])
    return TokenBatch(input_ids=ids, modality_ids=mods, positions=torch.arange(5)[None], segment_ids=torch.zeros(1, 5,
                      dtype=torch.long), block_ids=torch.full((1, 5), -1), loss_mask=torch.ones(1, 5),
                      example_weight=torch.ones(1, 5))


def logged(objective, stage: str) -> dict[str, float]:
    module = MMGrowModule(vocab=SIZES, dim=8, depth=1, objective=objective)
    module.model = UniformLogits()
    objective.bind(SIZES)
    out: dict[str, float] = {}
    module.log = lambda name, value, **kw: out.__setitem__(name, float(value))
    module._step(batch(), stage)
    return out


def test_bits_per_token_from_known_logits():
    out = logged(AutoregressiveObjective(), "val")
    # uniform logits: text targets cost ln 7 nats = log2 7 = 2.8073549 bits, video ln 5 = 2.3219281 bits;
    # the default loss is the mean over the two modalities: (2.8073549 + 2.3219281) / 2 = 2.5646415 bits
    assert out["val/loss"] == pytest.approx((math.log(7) + math.log(5)) / 2, abs=1e-12)
    assert out["val/bits_per_token"] == pytest.approx(2.5646415, abs=1e-7)
    assert out["val/bits_per_token_text"] == pytest.approx(2.8073549, abs=1e-7)
    assert out["val/bits_per_token_video"] == pytest.approx(2.3219281, abs=1e-7)
    assert logged(AutoregressiveObjective(), "test")["test/bits_per_token"] == pytest.approx(2.5646415, abs=1e-7)


def test_no_bits_for_training_steps_or_a_loss_that_is_not_a_likelihood():
    assert not any("bits" in k for k in logged(AutoregressiveObjective(), "train"))
    assert AutoregressiveObjective.loss_is_nll_nats and not FlowMatchingObjective.loss_is_nll_nats
    # flow matching's discrete part is this same cross-entropy, yet its total loss mixes in a velocity MSE
    out = logged(FlowMatchingObjective(), "val")
    assert "val/loss" in out and not any("bits" in k for k in out)
