"""AutoregressiveObjective: loss against a float64 per-token loop, masks, weighting, sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import mmgrow
from mmgrow.batch import TokenBatch
from mmgrow.objectives.autoregressive import AutoregressiveObjective, target_mask
from mmgrow.protocols import MaskSpec, MixerCapabilityError, MixerState, ModelOutput
from mmgrow.tokenspace import TokenSpace

SIZES = {"text": 7, "video": 5}
SPACE = TokenSpace.from_dict(SIZES)
DIM = 6


# --------------------------------------------------------------------------------------------------
# helpers: a batch, a fake model output with fixed linear heads, and a float64 reference loop
# --------------------------------------------------------------------------------------------------


def make_batch(seed: int = 0, segments=None, modalities=None, loss_mask=None, example_weight=None) -> TokenBatch:
    """Two rows of 10 tokens: row 0 packs two examples + padding, row 1 is one example + padding."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.tensor(segments if segments is not None else
                       [[0, 0, 0, 0, 1, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0, 0, -1, -1]])
    mods = torch.tensor(modalities if modalities is not None else
                        [[0, 1, 1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    local = torch.where(mods == 0, torch.randint(0, SIZES["text"], seg.shape, generator=g),
                        torch.randint(0, SIZES["video"], seg.shape, generator=g))
    ids = local + torch.where(mods == 0, 0, SPACE.offset("video"))
    ids = torch.where(seg < 0, torch.zeros_like(ids), ids)
    positions = torch.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            positions[b, t] = positions[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    lm = torch.tensor(loss_mask if loss_mask is not None else
                      [[1, 1, 1, 1, 1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    ew = torch.tensor(example_weight if example_weight is not None else
                      [[1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0], [2.0] * 8 + [0.0, 0.0]])
    blocks = torch.where(mods == 1, 0, -1)
    return TokenBatch(input_ids=ids, modality_ids=mods, positions=positions, segment_ids=seg, block_ids=blocks,
                      loss_mask=lm, example_weight=ew)


class LinearHeads:
    """``logits(h, m) = h @ W_m``: a fixed random linear map per modality, float64."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weights = {m: torch.randn(DIM, n, generator=g, dtype=torch.float64).requires_grad_()
                        for m, n in SIZES.items()}

    def __call__(self, h: torch.Tensor, modality: str) -> torch.Tensor:
        return h @ self.weights[modality]


def make_output(batch: TokenBatch, seed: int = 1) -> tuple[ModelOutput, torch.Tensor, LinearHeads]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*batch.input_ids.shape, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    heads = LinearHeads(seed)
    return ModelOutput(hidden=hidden, logits=heads), hidden, heads


def reference_loss(batch: TokenBatch, hidden: torch.Tensor, heads: LinearHeads, weights: dict[str, float]):
    """Explicit loop over tokens in float64; returns (loss, {modality: L_m})."""
    num = {m: 0.0 for m in SIZES}
    den = {m: 0.0 for m in SIZES}
    B, T = batch.input_ids.shape
    for b in range(B):
        for t in range(1, T):
            seg_now, seg_prev = int(batch.segment_ids[b, t]), int(batch.segment_ids[b, t - 1])
            if batch.loss_mask[b, t] <= 0 or seg_now < 0 or seg_now != seg_prev:
                continue
            m = SPACE.modalities[int(batch.modality_ids[b, t])]
            logits = heads(hidden[b, t - 1], m)
            target = int(batch.input_ids[b, t]) - SPACE.offset(m)
            ce = torch.logsumexp(logits, 0) - logits[target]
            w = float(batch.loss_mask[b, t]) * float(batch.example_weight[b, t])
            num[m] = num[m] + w * ce
            den[m] += w
    per = {m: num[m] / den[m] for m in SIZES if den[m] > 0}
    lam = {m: weights.get(m, 1.0) for m in per if weights.get(m, 1.0) > 0}
    total = sum(lam[m] * per[m] for m in lam) / sum(lam.values())
    return total, per


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------


def test_registered_and_unbound_error():
    obj = mmgrow.create("objectives", "autoregressive")
    assert isinstance(obj, AutoregressiveObjective)
    batch = make_batch()
    out, _, _ = make_output(batch)
    with pytest.raises(RuntimeError, match="not bound to a token space"):
        obj.loss(out, batch)


def test_target_mask_excludes_segment_starts_padding_and_position_zero():
    batch = make_batch(loss_mask=[[1] * 10, [1] * 10])
    expected = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(target_mask(batch), expected)


@pytest.mark.parametrize("weights", [None, {"video": 3.0, "text": 1.0}, {"video": 0.25}, {"text": 0.0}])
def test_loss_matches_float64_loop(weights):
    batch = make_batch()
    out, hidden, heads = make_output(batch)
    obj = AutoregressiveObjective(weights).bind(SPACE)
    loss, metrics = obj.loss(out, batch)
    ref, per = reference_loss(batch, hidden, heads, weights or {})
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for m, value in per.items():
        torch.testing.assert_close(metrics[f"loss_{m}"], value.detach(), rtol=1e-12, atol=1e-12)
    assert metrics["tokens_text"] == 5 and metrics["tokens_video"] == 8  # counted from make_batch by hand


def test_default_weights_give_each_modality_half_whatever_its_token_count():
    # LWM check: a batch with far more vision than text targets still splits the loss 50/50
    T = 203  # 2 text targets (position 0 is never one) and 200 video targets
    seg = [[0] * T]
    mods = [[0, 0, 0] + [1] * (T - 3)]
    batch = make_batch(segments=seg, modalities=mods, loss_mask=[[1] * T], example_weight=[[1.0] * T])
    out, _, _ = make_output(batch)
    loss, metrics = AutoregressiveObjective().bind(SPACE).loss(out, batch)
    assert metrics["tokens_video"] == 100 * metrics["tokens_text"]
    expected = 0.5 * metrics["loss_video"] + 0.5 * metrics["loss_text"]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)


def test_absent_modality_is_dropped_and_weights_renormalised():
    batch = make_batch(modalities=[[0] * 10, [0] * 10])  # text only
    out, hidden, heads = make_output(batch)
    loss, metrics = AutoregressiveObjective({"video": 3.0, "text": 0.5}).bind(SPACE).loss(out, batch)
    assert metrics["tokens_video"] == 0 and "loss_video" not in metrics and "acc_video" not in metrics
    # renormalised: the text term alone carries weight 1, not 0.5 / 3.5
    torch.testing.assert_close(loss.detach(), metrics["loss_text"], rtol=0, atol=0)
    torch.testing.assert_close(loss, reference_loss(batch, hidden, heads, {})[0], rtol=1e-12, atol=1e-12)


def test_excluded_positions_do_not_influence_the_loss():
    batch = make_batch()
    out, hidden, _ = make_output(batch)
    obj = AutoregressiveObjective().bind(SPACE)
    loss = obj.loss(out, batch)[0]
    # make_batch's loss mask already marks segment starts and padding; also mark position 0 and
    # scramble padding (text ids labelled video would raise if padding were ever a target)
    noisy = make_batch()
    noisy.loss_mask[1, 0] = 1
    noisy.input_ids[noisy.segment_ids < 0] = 3
    noisy.modality_ids[noisy.segment_ids < 0] = 1
    torch.testing.assert_close(obj.loss(out, noisy)[0], loss, rtol=0, atol=0)
    loss.backward()
    grad = hidden.grad.abs().sum(-1)
    # no gradient into states that predict nothing: last token of each example, padding, unmasked
    predicts = target_mask(batch)[:, 1:]
    assert torch.all(grad[:, :-1][~predicts] == 0) and torch.all(grad[:, -1] == 0)
    assert torch.all(grad[:, :-1][predicts] > 0)


def test_example_weights():
    batch = make_batch()
    out, hidden, heads = make_output(batch)
    obj = AutoregressiveObjective().bind(SPACE)
    base = obj.loss(out, batch)[0]
    scaled = make_batch(example_weight=(batch.example_weight * 4).tolist())
    torch.testing.assert_close(obj.loss(out, scaled)[0], base, rtol=1e-12, atol=1e-12)  # only ratios matter
    reweighted = make_batch(example_weight=[[1.0] * 4 + [9.0] * 6, [1.0] * 10])
    loss = obj.loss(out, reweighted)[0]
    torch.testing.assert_close(loss, reference_loss(reweighted, hidden, heads, {})[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(loss, base)


def test_zero_weight_everywhere_gives_a_differentiable_zero():
    batch = make_batch(loss_mask=[[0] * 10, [0] * 10])
    out, hidden, _ = make_output(batch)
    loss, metrics = AutoregressiveObjective().bind(SPACE).loss(out, batch)
    assert float(loss.detach()) == 0.0 and metrics["tokens_text"] == 0
    loss.backward()
    assert torch.all(hidden.grad == 0)


def test_gradients_match_reference():
    batch = make_batch()
    out, hidden, heads = make_output(batch)
    loss = AutoregressiveObjective({"video": 2.0}).bind(SPACE).loss(out, batch)[0]
    grads = torch.autograd.grad(loss, [hidden, *heads.weights.values()])
    ref = reference_loss(batch, hidden, heads, {"video": 2.0})[0]
    ref_grads = torch.autograd.grad(ref, [hidden, *heads.weights.values()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_accuracy_metric():
    batch = make_batch()
    out, hidden, heads = make_output(batch)
    _, metrics = AutoregressiveObjective().bind(SPACE).loss(out, batch)
    mask = target_mask(batch)
    for index, m in enumerate(SPACE.modalities):
        hits = []
        for b, t in mask.nonzero().tolist():
            if int(batch.modality_ids[b, t]) == index:
                pred = int(heads(hidden[b, t - 1], m).argmax())
                hits.append(pred == int(batch.input_ids[b, t]) - SPACE.offset(m))
        assert math.isclose(float(metrics[f"acc_{m}"]), sum(hits) / len(hits))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"modality_weights\['text'\] must be a finite number >= 0"):
        AutoregressiveObjective({"text": -1.0})
    with pytest.raises(ValueError, match=r"names \['vidoe'\], which are not in the token space"):
        AutoregressiveObjective({"vidoe": 1.0}).bind(SPACE)
    batch = make_batch()
    obj = AutoregressiveObjective(token_space=SIZES)
    with pytest.raises(ValueError, match=r"output.hidden must be \[B, T, D\]"):
        obj.loss(ModelOutput(hidden=torch.zeros(2, 9, DIM), logits=LinearHeads()), batch)
    wrong = make_batch()
    wrong.modality_ids[1, 3] = 0  # a video id labelled as text
    wrong.input_ids[1, 3] = SPACE.offset("video")
    with pytest.raises(ValueError, match="modality_ids and input_ids disagree"):
        obj.loss(make_output(wrong)[0], wrong)
    out = ModelOutput(hidden=torch.zeros(2, 10, DIM), logits=lambda h, m: torch.zeros(h.shape[0], 3))
    with pytest.raises(ValueError, match=r"returned \(\d+, 3\), expected"):
        obj.loss(out, batch)


def test_context_is_causal_without_blocks():
    obj = AutoregressiveObjective()
    batch = make_batch()
    ctx = obj.context(batch)
    assert ctx.mask.causal and ctx.block_ids is None
    assert torch.equal(ctx.segment_ids, batch.segment_ids) and torch.equal(ctx.positions, batch.positions)
    assert torch.equal(ctx.modality_ids, batch.modality_ids)
    plain = make_batch(segments=[[0] * 10, [3] * 10])  # one example per row, no padding
    assert obj.context(plain).segment_ids is None
    right_padded = make_batch(segments=[[0] * 7 + [-1] * 3, [3] * 10])
    assert obj.context(right_padded).segment_ids is None
    left_padded = make_batch(segments=[[-1] * 3 + [0] * 7, [3] * 10])
    assert torch.equal(obj.context(left_padded).segment_ids, left_padded.segment_ids)
    gap = make_batch(segments=[[0] * 4 + [-1] + [0] * 5, [3] * 10])
    assert obj.context(gap).segment_ids is not None
    assert obj.context(batch, mask=MaskSpec(causal=True, window=4)).mask.window == 4
    with pytest.raises(ValueError, match="needs a causal mask"):
        obj.context(batch, mask=MaskSpec(causal=False))


# --------------------------------------------------------------------------------------------------
# generate, on a tiny recurrent model implementing the UnifiedModel API
# --------------------------------------------------------------------------------------------------


@dataclass
class RecurrentState(MixerState):
    h: torch.Tensor


class TinyRecurrentLM(nn.Module):
    """``h_t = 0.6 h_{t-1} + tanh(E[x_t] + P[pos_t])``; heads per modality. Same API as UnifiedModel:
    ``token_space``, ``supports_state``, ``init_states``, ``forward(ids, ctx, states)``, ``logits``."""

    def __init__(self, stateful: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.token_space = SPACE
        self.stateful = stateful
        self.embed = nn.Embedding(SPACE.total, DIM)
        self.pos = nn.Embedding(64, DIM)
        self.drop = nn.Dropout(0.5)  # would make decoding random if generate forgot eval()
        self.heads = nn.ModuleDict({m: nn.Linear(DIM, n) for m, n in SIZES.items()})
        self.seen_training: list[bool] = []
        self.eval()

    @property
    def supports_state(self) -> bool:
        return self.stateful

    def init_states(self, batch_size, device, dtype):
        if not self.stateful:
            raise MixerCapabilityError("no state")
        return [RecurrentState(h=torch.zeros(batch_size, DIM, device=device, dtype=dtype))]

    def forward(self, input_ids, ctx, states=None):
        self.seen_training.append(self.training)
        x = self.drop(self.embed(input_ids) + self.pos(ctx.positions))
        h = states[0].h if states is not None else x.new_zeros(x.shape[0], DIM)
        outs = []
        for t in range(x.shape[1]):
            h = 0.6 * h + torch.tanh(x[:, t])
            outs.append(h)
        return ModelOutput(hidden=torch.stack(outs, 1), logits=self.logits,
                           states=[RecurrentState(h=h)] if states is not None else None)

    def logits(self, hidden, modality):
        return self.heads[modality](hidden)


def prefix_rerun(model, prompt, modality, steps, pick):
    """Reference decoder: re-run the full prefix every step; ``pick(logits [B, V], k) -> [B]``."""
    from mmgrow.protocols import SeqContext

    ids, out = prompt, []
    for k in range(steps):
        ctx = SeqContext.simple(*ids.shape)
        hidden = model(ids, ctx).hidden
        tok = pick(model.logits(hidden[:, -1], modality), k)
        out.append(tok)
        ids = torch.cat([ids, (tok + SPACE.offset(modality))[:, None]], 1)
    return torch.stack(out, 1)


def make_prompt(seed: int = 3, batch_size: int = 3, length: int = 4) -> torch.Tensor:
    return torch.randint(0, SPACE.total, (batch_size, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stateful", [True, False])
def test_greedy_equals_prefix_rerun_argmax(stateful):
    model = TinyRecurrentLM(stateful=stateful)
    model.eval()
    prompt = make_prompt()
    got = AutoregressiveObjective().generate(model, prompt, modality="video", max_new_tokens=12, greedy=True)
    ref = prefix_rerun(model, prompt, "video", 12, lambda logits, k: logits.argmax(-1))
    assert got.shape == (3, 12) and got.dtype == torch.long
    assert torch.equal(got, ref)
    assert len(set(got.flatten().tolist())) > 1  # the test model does not decode a constant


def test_with_state_equals_without_state_and_restores_train_mode():
    obj = AutoregressiveObjective()
    prompt = make_prompt(seed=5)
    stateful, plain = TinyRecurrentLM(stateful=True), TinyRecurrentLM(stateful=False)
    stateful.train()
    a = obj.generate(stateful, prompt, modality="text", max_new_tokens=10, greedy=True)
    b = obj.generate(plain, prompt, modality="text", max_new_tokens=10, greedy=True)
    assert torch.equal(a, b)
    assert stateful.training and not any(stateful.seen_training)
    # stateful decoding is one prefill + one T == 1 step per new token
    assert len(stateful.seen_training) == 10 and len(plain.seen_training) == 10


def test_top_k_one_equals_greedy_and_top_k_restricts_samples():
    model = TinyRecurrentLM()
    obj = AutoregressiveObjective()
    prompt = make_prompt()
    greedy = obj.generate(model, prompt, modality="text", max_new_tokens=8, greedy=True)
    top1 = obj.generate(model, prompt, modality="text", max_new_tokens=8, top_k=1, temperature=2.0,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)
    sampled = obj.generate(model, prompt, modality="text", max_new_tokens=8, top_k=2, temperature=5.0,
                           generator=torch.Generator().manual_seed(1))
    # replay the sampled continuation: every token must be among the top-2 logits of its step
    ids = torch.cat([prompt, sampled + SPACE.offset("text")], 1)
    from mmgrow.protocols import SeqContext

    hidden = model(ids, SeqContext.simple(*ids.shape)).hidden
    top2 = model.logits(hidden[:, prompt.shape[1] - 1:-1], "text").topk(2, -1).indices  # [B, 8, 2]
    assert torch.all((top2 == sampled[..., None]).any(-1))
    assert not torch.equal(sampled, greedy)


@pytest.mark.parametrize("temperature,top_k", [(0.5, None), (2.0, None), (2.0, 3)])
def test_sampling_distribution_matches_tempered_top_k_softmax(temperature, top_k):
    from mmgrow.protocols import SeqContext

    model = TinyRecurrentLM()
    n = 4000
    prompt = make_prompt(batch_size=1).expand(n, -1).contiguous()
    got = AutoregressiveObjective().generate(model, prompt, modality="text", max_new_tokens=1,
                                             temperature=temperature, top_k=top_k,
                                             generator=torch.Generator().manual_seed(0))[:, 0]
    with torch.no_grad():
        logits = model.logits(model(prompt[:1], SeqContext.simple(1, prompt.shape[1])).hidden[0, -1], "text")
    logits = logits.double() / temperature
    if top_k is not None:
        logits[logits < logits.topk(top_k).values[-1]] = -math.inf
    expected = torch.softmax(logits, -1)
    freq = torch.bincount(got, minlength=SIZES["text"]).double() / n
    tolerance = 4 * torch.sqrt(expected * (1 - expected) / n) + 1e-12  # 4 sigma of a binomial frequency
    assert torch.all((freq - expected).abs() <= tolerance), (freq, expected)
    assert float(expected.max()) < 0.9  # the test model is not (nearly) deterministic


def test_seeded_sampling_is_reproducible():
    model = TinyRecurrentLM()
    obj = AutoregressiveObjective()
    prompt = make_prompt()
    kw = {"modality": "text", "max_new_tokens": 20, "temperature": 3.0}
    a = obj.generate(model, prompt, generator=torch.Generator().manual_seed(7), **kw)
    b = obj.generate(model, prompt, generator=torch.Generator().manual_seed(7), **kw)
    c = obj.generate(model, prompt, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_constraint_is_respected():
    model = TinyRecurrentLM()
    obj = AutoregressiveObjective()
    prompt = make_prompt()
    greedy = obj.generate(model, prompt, modality="text", max_new_tokens=6, greedy=True)

    def only_least_likely_of_greedy(k):  # forbid exactly what greedy picked for row 0 at step k
        allowed = torch.ones(SIZES["text"], dtype=torch.bool)
        allowed[int(greedy[0, k])] = False
        return allowed

    out = obj.generate(model, prompt[:1], modality="text", max_new_tokens=6, greedy=True,
                       constraint=only_least_likely_of_greedy)
    assert torch.all(out[0] != greedy[0])

    def parity(k):  # even ids at even steps, odd ids at odd steps
        return torch.arange(SIZES["text"]) % 2 == k % 2

    sampled = obj.generate(model, prompt, modality="text", max_new_tokens=9, temperature=10.0,
                           constraint=parity, generator=torch.Generator().manual_seed(0))
    assert torch.all(sampled % 2 == torch.arange(9) % 2)


def test_pixel_constraint_produces_decodable_video():
    from mmgrow.tokenizers.pixels import PixelTokenizer

    codec = PixelTokenizer(grid=2)
    space = TokenSpace.from_dict({"text": 7, "video": codec.vocab_size})

    class Model(TinyRecurrentLM):
        def __init__(self):
            nn.Module.__init__(self)
            torch.manual_seed(0)
            self.token_space, self.stateful, self.seen_training = space, True, []
            self.embed, self.pos = nn.Embedding(space.total, DIM), nn.Embedding(64, DIM)
            self.drop = nn.Identity()
            self.heads = nn.ModuleDict({m: nn.Linear(DIM, n) for m, n in space.to_dict().items()})

    frames = 3
    bov = torch.tensor([[space.offset("video") + codec.special_tokens["bov"]]] * 2)
    prompt = torch.cat([make_prompt(batch_size=2, length=3) % 7, bov], 1)
    out = AutoregressiveObjective().generate(Model(), prompt, modality="video",
                                             max_new_tokens=codec.num_tokens(frames) - 1, temperature=1.0,
                                             constraint=codec.generation_constraint(frames),
                                             generator=torch.Generator().manual_seed(0))
    for row in out:
        assert torch.equal(codec.encode(codec.decode(row))[1:], row)  # well-formed: re-encodes identically
        assert codec.decode(row).shape == (frames, 2, 2, 3)


def test_generate_bad_inputs():
    model = TinyRecurrentLM()
    obj = AutoregressiveObjective()
    prompt = make_prompt()
    with pytest.raises(KeyError, match="'audio' is not in the model's token space"):
        obj.generate(model, prompt, modality="audio", max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_ids must be int64"):
        obj.generate(model, prompt[0], modality="text", max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        obj.generate(model, prompt, modality="text", max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        obj.generate(model, prompt, modality="text", max_new_tokens=2, top_k=0)
    with pytest.raises(ValueError, match="allows no token"):
        obj.generate(model, prompt, modality="text", max_new_tokens=2,
                     constraint=lambda k: torch.zeros(SIZES["text"], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must return a bool tensor of shape \[7\]"):
        obj.generate(model, prompt, modality="text", max_new_tokens=2, constraint=lambda k: torch.ones(5))
    assert obj.generate(model, prompt, modality="text", max_new_tokens=0).shape == (3, 0)


# --------------------------------------------------------------------------------------------------
# the real UnifiedModel (FullAttention with a KV cache)
# --------------------------------------------------------------------------------------------------


def tiny_unified():
    from mmgrow.models.unified import UnifiedModel

    torch.manual_seed(0)
    # a large init_std so the random model's greedy output is not one repeated token
    return UnifiedModel(token_space=SIZES, dim=16, depth=2, init_std=0.5).eval()


def test_unified_model_greedy_stateful_equals_prefix_rerun_and_stateless():
    from mmgrow.models.unified import UnifiedModel

    model = tiny_unified()
    assert model.supports_state

    class StatelessUnified(UnifiedModel):
        supports_state = False  # forces generate to re-run the whole prefix

    plain = StatelessUnified(token_space=SIZES, dim=16, depth=2).eval()
    plain.load_state_dict(model.state_dict())
    obj = AutoregressiveObjective()
    prompt = make_prompt(seed=11, batch_size=2, length=5)
    a = obj.generate(model, prompt, modality="video", max_new_tokens=6, greedy=True)
    b = obj.generate(plain, prompt, modality="video", max_new_tokens=6, greedy=True)
    ref = prefix_rerun(model, prompt, "video", 6, lambda logits, k: logits.argmax(-1))
    assert torch.equal(a, ref) and torch.equal(b, ref)
    assert len(set(a.flatten().tolist())) > 1


def test_unified_model_trains_through_objective_context_and_loss():
    model = tiny_unified().train()
    obj = AutoregressiveObjective().bind(model.token_space)
    batch = make_batch()
    out = model(batch.input_ids, obj.context(batch))
    loss, _ = obj.loss(out, batch)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and model.heads["video"].weight.grad.abs().sum() > 0
    # the per-token loop over the same hidden states and heads gives the same packed-batch loss
    ref, _ = reference_loss(batch, out.hidden.double(),
                            lambda h, m: model.logits(h.float(), m).double(), {})
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_dropping_segment_ids_of_right_padded_rows_changes_nothing():
    """The context drops segment ids for one-example rows with right padding; the loss and every
    gradient equal those computed with the segment ids kept (float64, real model)."""
    from dataclasses import replace

    from mmgrow.models.unified import UnifiedModel

    torch.manual_seed(0)
    model = UnifiedModel(token_space=SIZES, dim=16, depth=2).double()
    obj = AutoregressiveObjective(token_space=SPACE)
    batch = make_batch(segments=[[0] * 7 + [-1] * 3, [0] * 10])
    ctx = obj.context(batch)
    assert ctx.segment_ids is None
    results = []
    for c in (ctx, replace(ctx, segment_ids=batch.segment_ids)):
        model.zero_grad()
        loss, _ = obj.loss(model(batch.input_ids, c), batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for g0, g1 in zip(results[0][1], results[1][1]):
        assert torch.allclose(g0, g1, rtol=0, atol=1e-12)
