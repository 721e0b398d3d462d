"""Flow matching: the loss at the exact velocity, the samplers, guidance, dropout, and the DiT pieces."""

import math

import pytest
import torch
from torch import nn

from mmgrow.batch import TokenBatch
from mmgrow.data.collate import pad_collate
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.layers.attention import FullAttention
from mmgrow.models.block import Block
from mmgrow.models.modulation import AdaLNZero
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.flow_matching import FlowMatchingObjective
from mmgrow.protocols import ModelOutput, Segment, SeqContext, Tokenizer
from mmgrow.tokenizers.text import ByteTokenizer
from mmgrow.tokenspace import TokenSpace

C = 4


class GivenLatents(Tokenizer):
    """A continuous codec whose raw items already are latents ``[n, C]`` (one block: the clip)."""

    modality = "video"
    kind = "continuous"
    latent_dim = C

    def encode(self, raw):
        return raw.float()

    def block_ids(self, tokens):
        return torch.zeros(tokens.shape[0], dtype=torch.long)


def builder():
    return SequenceBuilder({"text": ByteTokenizer(), "video": GivenLatents()})


def clip_batch(n=6, rows=3, text_role="input", seed=0):
    g = torch.Generator().manual_seed(seed)
    b = builder()
    seqs = [b.build([Segment("text", f"clip {r}", text_role), Segment("video", torch.randn(n, C, generator=g), "target")])
            for r in range(rows)]
    return b, pad_collate(seqs)


class PointMassVelocity(nn.Module):
    """Predicts ``scale * (x1 - x_t) / (1 - t)``: the exact marginal velocity of data that is the single
    point ``x1`` (``scale = 1``). ``ctx.timestep`` is ``t [B, 1]`` itself."""

    def __init__(self, space: TokenSpace, x1: torch.Tensor):
        super().__init__()
        self.token_space, self.continuous, self.x1 = space, {"video": C}, x1
        self.timestep_embedding = True
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def embed_timestep(self, t):
        return t[:, None]

    def forward(self, input_ids, ctx, states=None, latents=None):
        t = ctx.timestep[:, :, None]
        return ModelOutput(hidden=self.scale * (self.x1 - latents) / (1 - t), logits=lambda h, m: h)


def test_loss_and_gradient_vanish_at_the_exact_velocity():
    torch.manual_seed(0)
    b = builder()
    x1 = torch.randn(5, C, dtype=torch.float64)
    batch = pad_collate([b.build([Segment("text", "x", "input"), Segment("video", x1, "target")])] * 4)
    batch = TokenBatch(**{**batch.__dict__, "latents": batch.latents.double()})
    model = PointMassVelocity(b.token_space, batch.latents.clone())
    objective = FlowMatchingObjective(token_space=b.token_space)
    loss, metrics = objective.step(model, batch, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert float(loss.detach()) < 1e-20 and abs(float(model.scale.grad)) < 1e-10
    assert float(metrics["tokens_video"]) == 4 * 5
    with torch.no_grad():
        model.scale.fill_(1.2)
    model.scale.grad = None
    loss, _ = objective.step(model, batch, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert float(loss.detach()) > 1e-3 and float(model.scale.grad) > 1e-3


def test_flow_targets_follow_the_straight_path():
    b, batch = clip_batch()
    model = UnifiedModel(token_space=b.token_space.to_dict(), dim=16, depth=1, continuous={"video": C})
    objective = FlowMatchingObjective(token_space=b.token_space)
    g = torch.Generator().manual_seed(3)
    flow = objective.flow_targets(model, batch, g)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(3, generator=g)
    x0 = torch.randn(batch.latents.shape, generator=g)
    target = (batch.modality_ids == 1) & (batch.loss_mask > 0)
    x1 = batch.latents
    expected = torch.where(target[..., None], (1 - t[:, None, None]) * x0 + t[:, None, None] * x1, x1)
    torch.testing.assert_close(flow.inputs, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(flow.velocity, torch.where(target[..., None], x1 - x0, 0.0), rtol=0, atol=1e-6)
    assert torch.equal(flow.mask, target)


def dit(space, seed=0, cross=True, randomise=True):
    torch.manual_seed(seed)
    model = UnifiedModel(token_space=space.to_dict(), dim=32, depth=2, continuous={"video": C},
                         modulation={"kind": "adaln_zero", "cond_dim": 16},
                         cross_attention={"cond_dim": 8, "num_heads": 2} if cross else None).double()
    if randomise:  # zero-initialised gates and heads would make every comparison below trivially 0 == 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modulation" in name or "heads" in name:
                    p.normal_(0, 0.1)
    return model


def with_condition(batch, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(batch.input_ids.shape[0], 3, 8, generator=g, dtype=dtype)
    return TokenBatch(**{**batch.__dict__, "latents": batch.latents.to(dtype), "condition": cond,
                         "condition_mask": torch.ones(cond.shape[:2], dtype=torch.bool)})


def test_sampler_is_deterministic_with_a_seed_and_keeps_inputs():
    b, batch = clip_batch()
    batch = with_condition(batch)
    model, objective = dit(b.token_space), FlowMatchingObjective(token_space=b.token_space)
    runs = [objective.generate(model, batch, steps=3, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    target = (batch.modality_ids == 1) & (batch.loss_mask > 0)
    assert torch.equal(runs[0][~target], batch.latents[~target])


class LinearField(nn.Module):
    """``v(x, t) = -x``: the exact flow from ``x(0)`` is ``x(1) = x(0) / e``."""

    def __init__(self, space):
        super().__init__()
        self.token_space, self.continuous, self.timestep_embedding = space, {"video": C}, None
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, ctx, states=None, latents=None):
        return ModelOutput(hidden=-latents, logits=lambda h, m: h)


@pytest.mark.parametrize("solver, steps, order", [("euler", 40, 1), ("heun", 40, 2)])
def test_solvers_converge_at_their_order(solver, steps, order):
    b, batch = clip_batch()
    batch = TokenBatch(**{**batch.__dict__, "latents": batch.latents.double()})
    objective, model = FlowMatchingObjective(token_space=b.token_space), LinearField(b.token_space)
    target = ((batch.modality_ids == 1) & (batch.loss_mask > 0))[..., None]
    errors = []
    for n in (steps, 2 * steps):
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(batch.latents.shape, generator=g, dtype=torch.float64)
        out = objective.generate(model, batch, steps=n, solver=solver, generator=torch.Generator().manual_seed(0))
        errors.append(float((out - x0 / math.e).abs()[target.expand_as(out)].max()))
    # Halving the step divides the error by 2**order (Euler 2, Heun 4), up to higher-order terms.
    assert errors[0] / errors[1] == pytest.approx(2 ** order, rel=0.05)
    assert errors[1] < (0.01 if order == 1 else 1e-4)


def test_guidance_one_is_the_conditional_model_and_g_mixes_linearly():
    b, batch = clip_batch()
    batch = with_condition(batch)
    model, objective = dit(b.token_space), FlowMatchingObjective(token_space=b.token_space)
    target = ((batch.modality_ids == 1) & (batch.loss_mask > 0))[..., None].double()
    x0 = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = target * x0 + (1 - target) * batch.latents
    model.eval()

    def v(drop):  # one velocity evaluation at t = 0, written out directly against the model
        mask = torch.zeros_like(batch.condition_mask) if drop else batch.condition_mask
        ctx = SeqContext(positions=batch.positions, block_ids=batch.block_ids, modality_ids=batch.modality_ids,
                         condition=batch.condition, condition_mask=mask,
                         timestep=model.embed_timestep(torch.zeros(3, dtype=torch.float64)))
        out = model(batch.input_ids, ctx, latents=x)
        return out.logits(out.hidden, "video") * target

    with torch.no_grad():
        v_c, v_u = v(False), v(True)
    assert not torch.allclose(v_c, v_u)  # the condition matters, so the checks below can fail
    for g in (1.0, 3.0):
        out = objective.generate(model, batch, steps=1, guidance=g, generator=torch.Generator().manual_seed(2))
        expected = x + (v_u + g * (v_c - v_u))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_loss_is_the_mean_of_the_velocity_and_text_losses():
    b, batch = clip_batch(text_role="target")
    model = dit(b.token_space, cross=False).float()
    objective = FlowMatchingObjective(token_space=b.token_space)
    loss, metrics = objective.step(model, batch, generator=torch.Generator().manual_seed(0))
    assert float(metrics["tokens_text"]) > 0 and float(metrics["tokens_video"]) == 18
    torch.testing.assert_close(loss.detach(), (metrics["loss_text"] + metrics["loss_video"]) / 2)
    weighted = FlowMatchingObjective({"text": 3.0}, token_space=b.token_space)
    loss3, m3 = weighted.step(model, batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss3.detach(), (3 * m3["loss_text"] + m3["loss_video"]) / 4)


def test_condition_dropout_rate_and_eval_keeps_condition():
    b, batch = clip_batch(rows=2)
    cond = torch.randn(4000, 2, 8)
    big = TokenBatch(**{k: (v.repeat(2000, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v)
                        for k, v in batch.__dict__.items() if k not in ("condition", "condition_mask")},
                     condition=cond, condition_mask=torch.ones(4000, 2, dtype=torch.bool))
    objective = FlowMatchingObjective(condition_dropout=0.25, token_space=b.token_space)
    dropped = ~objective.drop_condition(big, torch.Generator().manual_seed(0)).condition_mask.any(-1)
    rate, sigma = float(dropped.float().mean()), math.sqrt(0.25 * 0.75 / 4000)
    assert abs(rate - 0.25) < 4 * sigma


def test_a_discrete_target_inside_a_block_is_an_error():
    b = builder()
    seq = b.build([Segment("text", "ab", "target", block=0), Segment("video", torch.randn(3, C), "target", block=0)])
    batch = pad_collate([seq])
    model = dit(b.token_space, cross=False, randomise=False).float()
    with pytest.raises(ValueError, match="discrete target lies where the position predicting it can see it"):
        FlowMatchingObjective(token_space=b.token_space).step(model, batch)


def test_dit_is_the_identity_at_initialisation():
    torch.manual_seed(0)
    block = Block(16, FullAttention(dim=16, num_heads=2), 32, modulation=AdaLNZero(16, 8))
    x = torch.randn(2, 5, 16)
    ctx = SeqContext.simple(2, 5, causal=False)
    ctx.timestep = torch.randn(2, 8)
    assert torch.equal(block(x, ctx)[0], x)
    b, batch = clip_batch()
    model = dit(b.token_space, cross=False, randomise=False).float()
    ctx = FlowMatchingObjective(token_space=b.token_space).context(batch, timestep=model.embed_timestep(torch.rand(3)))
    out = model(batch.input_ids, ctx, latents=batch.latents)
    assert torch.equal(out.logits(out.hidden, "video"), torch.zeros(3, batch.input_ids.shape[1], C))


def test_model_input_errors():
    b, batch = clip_batch()
    model = dit(b.token_space, cross=False, randomise=False).float()
    ctx = FlowMatchingObjective(token_space=b.token_space).context(batch, timestep=model.embed_timestep(torch.rand(3)))
    with pytest.raises(ValueError, match="holds continuous 'video' positions, so latents must be"):
        model(batch.input_ids, ctx)
    with pytest.raises(ValueError, match="ctx.timestep is None"):
        model(batch.input_ids, FlowMatchingObjective(token_space=b.token_space).context(batch), latents=batch.latents)
    with pytest.raises(ValueError, match="not in the token space"):
        UnifiedModel(token_space={"text": 5}, dim=8, depth=1, continuous={"video": 4})
    with pytest.raises(ValueError, match="guidance=2.0 needs a condition"):
        FlowMatchingObjective(token_space=b.token_space).generate(model, batch, guidance=2.0)


def test_sample_writers_skip_token_targets_the_objective_cannot_sample():
    """A flow-matching run whose tasks target text writes no captions (it has no token sampler) instead
    of crashing at fit end; an autoregressive run does sample them, and continuous video still samples."""
    from types import SimpleNamespace

    from mmgrow.objectives.autoregressive import AutoregressiveObjective
    from mmgrow.objectives.flow_matching import FlowMatchingObjective
    from mmgrow.training.samples import GenerateCaptions, GenerateSamples

    def trainer(objective, video_kind):
        task = SimpleNamespace(target_modalities=("text", "video"))
        codecs = {"text": SimpleNamespace(kind="discrete"), "video": SimpleNamespace(kind=video_kind)}
        return SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(tasks=[task], codecs=codecs),
                               lightning_module=SimpleNamespace(objective=objective))

    flow, ar = FlowMatchingObjective(), AutoregressiveObjective()
    assert not GenerateCaptions().active(trainer(flow, "continuous"))
    assert GenerateSamples().active(trainer(flow, "continuous"))
    assert GenerateCaptions().active(trainer(ar, "discrete"))
    assert GenerateSamples().active(trainer(ar, "discrete"))
