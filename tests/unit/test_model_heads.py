"""UnIVAL model options: one shared head over all ids, learned modality embeddings, and their model.yaml round trip."""

from __future__ import annotations

import pytest
import torch

from mmgrow.batch import TokenBatch
from mmgrow.models.timestep import LatentHead
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.protocols import MaskSpec, ModelOutput, SeqContext
from mmgrow.tokenspace import TokenSpace

SIZES = {"text": 5, "video": 7}
SPACE = TokenSpace.from_dict(SIZES)


def make_batch(seed: int = 0) -> TokenBatch:
    """Two rows: row 0 packs two examples + padding, row 1 one example + padding; text and video targets."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0, 0, -1, -1]])
    mods = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    local = torch.where(mods == 0, torch.randint(0, 5, seg.shape, generator=g), torch.randint(0, 7, seg.shape, generator=g))
    ids = torch.where(seg < 0, 0, local + torch.where(mods == 0, 0, SPACE.offset("video")))
    positions = torch.cat([torch.arange(5), torch.arange(5)]).expand(2, 10).contiguous()
    positions[1] = torch.arange(10)
    lm = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    ew = torch.tensor([[1.0] * 4 + [0.5] * 5 + [0.0], [2.0] * 8 + [0.0, 0.0]])
    return TokenBatch(input_ids=ids, modality_ids=mods, positions=positions, segment_ids=seg,
                      block_ids=torch.full_like(seg, -1), loss_mask=lm, example_weight=ew)


def shared_reference(batch: TokenBatch, hidden: torch.Tensor, weight: torch.Tensor, weights: dict[str, float]):
    """float64 loop: ``CE_t = logsumexp(W h_{t-1}) - (W h_{t-1})[y_t]`` over ALL global ids."""
    num = {m: 0.0 for m in SIZES}
    den = {m: 0.0 for m in SIZES}
    for b in range(batch.input_ids.shape[0]):
        for t in range(1, batch.input_ids.shape[1]):
            seg, prev = int(batch.segment_ids[b, t]), int(batch.segment_ids[b, t - 1])
            if batch.loss_mask[b, t] <= 0 or seg < 0 or seg != prev:
                continue
            m = SPACE.modalities[int(batch.modality_ids[b, t])]
            logits = weight @ hidden[b, t - 1]                               # [total]
            ce = torch.logsumexp(logits, 0) - logits[int(batch.input_ids[b, t])]
            w = float(batch.loss_mask[b, t]) * float(batch.example_weight[b, t])
            num[m] = num[m] + w * ce
            den[m] += w
    lam = {m: weights.get(m, 1.0) for m in SIZES if den[m] > 0}
    return sum(lam[m] * num[m] / den[m] for m in lam) / sum(lam.values())


@pytest.mark.parametrize("weights", [{}, {"video": 3.0, "text": 1.0}])
def test_shared_head_loss_is_one_softmax_over_all_ids_forward_and_backward(weights):
    torch.manual_seed(0)
    model = UnifiedModel(token_space=SIZES, dim=8, depth=1, head="shared", init_std=0.5).double()
    assert model.shared_head and len(model.heads) == 0 and model.vocab_head.weight.shape == (SPACE.total, 8)
    batch = make_batch()
    hidden = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    obj = AutoregressiveObjective(weights).bind(model.token_space)
    loss, metrics = obj.loss(ModelOutput(hidden=hidden, logits=model.logits), batch)
    h_ref = hidden.detach().clone().requires_grad_()
    w_ref = model.vocab_head.weight.detach().clone().requires_grad_()
    ref = shared_reference(batch, h_ref, w_ref, weights)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.vocab_head.weight.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    # the per-modality softmax would give another loss: the modalities really compete here
    per_modality = UnifiedModel(token_space=SIZES, dim=8, depth=1).double()
    with torch.no_grad():
        for m in SIZES:
            off = SPACE.offset(m)
            per_modality.heads[m].weight.copy_(model.vocab_head.weight[off: off + SIZES[m]])
    other, _ = obj.loss(ModelOutput(hidden=hidden.detach(), logits=per_modality.logits), batch)
    assert float(other.detach()) < float(loss.detach()) - 1e-3
    assert set(metrics) >= {"loss_text", "loss_video", "acc_text", "acc_video"}


def test_shared_head_logits_are_the_modality_slice_and_continuous_keeps_its_latent_head():
    model = UnifiedModel(token_space={"text": 5, "video": 1, "image": 4}, dim=8, depth=1, head="shared",
                         continuous={"video": 3})
    assert set(model.heads) == {"video"} and isinstance(model.heads["video"], LatentHead)
    h = torch.randn(4, 8)
    full = model.vocabulary_logits(h)
    assert full.shape == (4, 10)
    torch.testing.assert_close(model.logits(h, "image"), full[:, 6:10], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.logits(h, "text"), full[:, 0:5], rtol=0, atol=1e-6)
    assert model.logits(h, "video").shape == (4, 3)
    with pytest.raises(KeyError, match="no head for modality 'audio'"):
        model.logits(h, "audio")
    with pytest.raises(ValueError, match="head must be one of"):
        UnifiedModel(token_space=SIZES, dim=8, depth=1, head="tied")
    with pytest.raises(ValueError, match="head='shared'"):
        UnifiedModel(token_space=SIZES, dim=8, depth=1).vocabulary_logits(h)


def test_shared_head_generate_samples_only_the_requested_modality():
    torch.manual_seed(3)
    model = UnifiedModel(token_space=SIZES, dim=8, depth=1, head="shared", init_std=1.0).eval()
    prompt = torch.tensor([[0, 1, 2], [3, 4, 0]])
    out = AutoregressiveObjective().generate(model, prompt, modality="video", max_new_tokens=20, greedy=False,
                                             generator=torch.Generator().manual_seed(0))
    assert int(out.min()) >= 0 and int(out.max()) < SIZES["video"]  # local video ids


def forward_inputs(model, ids, mods):
    ctx = SeqContext(positions=torch.arange(ids.shape[1]).expand_as(ids).contiguous(), modality_ids=mods,
                     mask=MaskSpec(causal=True))
    return model(ids, ctx).hidden


def test_modality_embeddings_change_outputs_with_modality_ids_and_use_the_model_init():
    torch.manual_seed(0)
    model = UnifiedModel(token_space=SIZES, dim=64, depth=1, modality_embeddings=True, init_std=0.05)
    table = model.modality_embedding.weight
    assert table.shape == (2, 64)
    assert 0.03 < float(table.detach().std()) < 0.07  # N(0, init_std), like the token embedding
    ids = torch.tensor([[1, 2, 3, 4]])
    a = forward_inputs(model, ids, torch.tensor([[0, 0, 0, 0]]))
    b = forward_inputs(model, ids, torch.tensor([[0, 0, 1, 0]]))
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2:], b[:, 2:])  # causal: from t = 2 on
    # it is exactly E[m] added to the input: with E = 0 the output equals the plain model's
    plain = UnifiedModel(token_space=SIZES, dim=64, depth=1)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("modality_embedding")})
    with torch.no_grad():
        model.modality_embedding.weight.zero_()
    torch.testing.assert_close(forward_inputs(model, ids, torch.tensor([[0, 0, 1, 0]])),
                               forward_inputs(plain, ids, torch.tensor([[0, 0, 1, 0]])), rtol=0, atol=0)
    # derived from the ids when the context has none
    with torch.no_grad():
        model.modality_embedding.weight.normal_()
    ctx = SeqContext(positions=torch.arange(4)[None], mask=MaskSpec(causal=True))
    torch.testing.assert_close(model(ids, ctx).hidden, forward_inputs(model, ids, SPACE.modality_of(ids)))


@pytest.mark.parametrize("options", [{"head": "shared"}, {"modality_embeddings": True},
                                     {"head": "shared", "modality_embeddings": True}])
def test_options_round_trip_through_model_yaml(tmp_path, options):
    from mmgrow.rundir import read_model_config, save_model
    from mmgrow.training.export import load_model
    from mmgrow.training.module import MMGrowModule

    module = MMGrowModule(vocab=SIZES, dim=16, depth=1, **options)
    module.configure_model()
    config = module.model_config()
    assert {k: config[k] for k in options} == options
    save_model(module.model, config, tmp_path)
    assert {k: read_model_config(tmp_path)[k] for k in options} == options
    loaded = load_model(tmp_path).eval()
    assert loaded.shared_head == (options.get("head") == "shared")
    assert (loaded.modality_embedding is not None) == options.get("modality_embeddings", False)
    ids = torch.tensor([[1, 2, 8, 9]])
    torch.testing.assert_close(forward_inputs(loaded, ids, SPACE.modality_of(ids)),
                               forward_inputs(module.model.eval(), ids, SPACE.modality_of(ids)), rtol=0, atol=0)
    # defaults leave model.yaml as before
    plain = MMGrowModule(vocab=SIZES, dim=16, depth=1)
    plain.configure_model()
    assert not {"head", "modality_embeddings", "input_encoders"} & set(plain.model_config())
