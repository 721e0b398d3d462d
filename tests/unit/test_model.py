"""UnifiedModel, Backbone and Block: shapes, heads, decoding with states, errors, residual outputs, init."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

from mmgrow.layers.attention import FullAttention
from mmgrow.layers.mlp import swiglu_hidden
from mmgrow.models.backbone import Backbone
from mmgrow.models.block import Block
from mmgrow.models.unified import UnifiedModel
from mmgrow.protocols import MaskSpec, MixerCapabilityError, SeqContext, SequenceMixer
from mmgrow.tokenspace import TokenSpace

SPACE = {"text": 50, "video": 30}


def small_model(**kw) -> UnifiedModel:
    torch.manual_seed(0)
    return UnifiedModel(token_space=SPACE, dim=32, depth=2, **kw).double()


class TokenwiseMixer(SequenceMixer):
    """A stateless mixer (``y = W x``) to build hybrids and test capability errors."""

    def __init__(self, *, dim: int, layer_idx: int = 0) -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        self.proj = nn.Linear(dim, dim)
        self.init_calls: list[float] = []

    def forward(self, x, ctx, state=None):
        self.check_context(x, ctx)
        return self.proj(x), None

    def residual_outputs(self):
        return [self.proj]


class SelfInitMixer(TokenwiseMixer):
    def init_weights(self, init_std: float) -> None:
        self.init_calls.append(init_std)
        nn.init.constant_(self.proj.weight, 0.5)
        nn.init.constant_(self.proj.bias, 0.25)


# --------------------------------------------------------------------------------------------------


def test_shapes_and_logits_per_modality() -> None:
    model = small_model()
    ids = torch.randint(0, 80, (2, 7))
    out = model(ids, SeqContext.simple(2, 7))
    assert out.hidden.shape == (2, 7, 32) and out.states is None
    text, video = out.logits(out.hidden, "text"), out.logits(out.hidden[:, :3], "video")
    assert text.shape == (2, 7, 50) and video.shape == (2, 3, 30)
    torch.testing.assert_close(video, out.hidden[:, :3] @ model.heads["video"].weight.T)
    with pytest.raises(KeyError, match="no head for modality 'audio'"):
        model.logits(out.hidden, "audio")


def test_token_space_object_and_embedding_covers_all_ids() -> None:
    model = UnifiedModel(token_space=TokenSpace.from_dict(SPACE), dim=16, depth=1)
    assert model.embed.num_embeddings == 80 and model.modalities == ["text", "video"]
    assert {m: h.out_features for m, h in model.heads.items()} == SPACE
    assert all(h.bias is None for h in model.heads.values())


@pytest.mark.parametrize("packed", [False, True])
def test_decoding_with_states_equals_prefill(packed: bool) -> None:
    model = small_model(mixer=functools.partial(FullAttention, num_heads=4, num_kv_heads=2)).eval()
    T = 9
    ids = torch.randint(0, 80, (2, T))
    if packed:
        seg = torch.tensor([[0] * 4 + [1] * 5, [0] * 7 + [-1] * 2])
        pos = torch.tensor([list(range(4)) + list(range(5)), list(range(7)) + [0, 0]])
        ctx = SeqContext(positions=pos, segment_ids=seg)
    else:
        ctx = SeqContext.simple(2, T)
    full = model(ids, ctx).hidden
    for bounds in ([0, 3, 9], list(range(T + 1))):
        states = model.init_states(2, "cpu", torch.float64)
        hidden = []
        for start, end in itertools.pairwise(bounds):
            out = model(ids[:, start:end], ctx.slice(start, end), states)
            states = out.states
            hidden.append(out.hidden)
        assert len(states) == 2
        torch.testing.assert_close(torch.cat(hidden, dim=1), full, rtol=0, atol=1e-12)


def test_bad_inputs_are_named() -> None:
    model = small_model()
    ctx = SeqContext.simple(2, 5)
    with pytest.raises(TypeError, match="input_ids must be int64"):
        model(torch.zeros(2, 5, dtype=torch.int32), ctx)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\], got shape \(2, 5, 1\)"):
        model(torch.zeros(2, 5, 1, dtype=torch.long), ctx)
    with pytest.raises(ValueError, match=r"input_ids is \(2, 4\) but ctx.positions is \(2, 5\)"):
        model(torch.zeros(2, 4, dtype=torch.long), ctx)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 80\).*got range \[0, 80\]"):
        model(torch.tensor([[0, 1, 2, 3, 80]] * 2), ctx)
    with pytest.raises(ValueError, match=r"got range \[-1, 3\]"):
        model(torch.tensor([[0, 1, 2, 3, -1]] * 2), ctx)
    with pytest.raises(ValueError, match="got 1 states for 2 layers"):
        model(torch.zeros(2, 5, dtype=torch.long), ctx, model.init_states(2, "cpu", torch.float64)[:1])
    with pytest.raises(TypeError, match="token_space must be a dict or TokenSpace"):
        UnifiedModel(token_space=[("text", 5)])


def test_residual_outputs_are_every_branch_output() -> None:
    model = small_model()
    expected = [lin for b in model.blocks for lin in (b.mixer.out_proj, b.mlp.w_down)]
    got = model.residual_outputs()
    assert len(got) == 4 and all(a is b for a, b in zip(got, expected))
    # Zeroing them turns every block into the identity: hidden = final_norm(embedding).
    with torch.no_grad():
        for lin in got:
            lin.weight.zero_()
    ids = torch.randint(0, 80, (1, 6))
    out = model(ids, SeqContext.simple(1, 6))
    torch.testing.assert_close(out.hidden, model.norm(model.embed(ids)), rtol=0, atol=0)


def test_hybrid_mixer_list_is_cycled_and_capabilities_checked() -> None:
    model = UnifiedModel(token_space=SPACE, dim=16, depth=3, mixer=[FullAttention, TokenwiseMixer])
    assert [type(m).__name__ for m in model.backbone.mixers] == ["FullAttention", "TokenwiseMixer", "FullAttention"]
    assert [m.layer_idx for m in model.backbone.mixers] == [0, 1, 2]
    assert not model.supports_state and small_model().supports_state
    with pytest.raises(MixerCapabilityError, match=r"layer 1 \(TokenwiseMixer\) does not support stateful"):
        model.init_states(1, "cpu", torch.float32)
    # A context feature one layer cannot honour is refused, not ignored.
    ctx = SeqContext(positions=torch.arange(4)[None], mask=MaskSpec(window=2))
    with pytest.raises(MixerCapabilityError, match="TokenwiseMixer cannot honour ctx.mask.window=2"):
        model(torch.zeros(1, 4, dtype=torch.long), ctx)


def test_backbone_factory_forms_and_errors() -> None:
    positional = Backbone(16, 2, lambda d, i: FullAttention(dim=d, layer_idx=i, num_heads=2))
    assert positional.blocks[1].mixer.num_heads == 2 and positional.blocks[1].mixer.layer_idx == 1
    default = Backbone(16, 1)
    assert isinstance(default.blocks[0].mixer, FullAttention) and default.blocks[0].mixer.num_heads == 4
    with pytest.raises(TypeError, match=r"returned Linear for layer 0; expected a mmgrow.protocols.SequenceMixer"):
        Backbone(16, 1, lambda d, i: nn.Linear(d, d))
    with pytest.raises(ValueError, match="layer 0 mixer FullAttention has dim 8, expected 16"):
        Backbone(16, 1, lambda d, i: FullAttention(dim=8, layer_idx=i, num_heads=2))
    with pytest.raises(ValueError, match="mixer list is empty"):
        Backbone(16, 1, [])
    with pytest.raises(TypeError, match="is not callable"):
        Backbone(16, 1, "full")
    with pytest.raises(ValueError, match="Block: mixer FullAttention has dim 8, expected 16"):
        Block(16, FullAttention(dim=8, num_heads=2), 32)


def test_jsonargparse_factory_builds_layers() -> None:
    """Recipes give ``mixer: {class_path, init_args}``; jsonargparse turns it into a keyword factory."""
    from jsonargparse import ArgumentParser

    from mmgrow.protocols import MixerFactory

    parser = ArgumentParser()
    parser.add_argument("--mixer", type=list[MixerFactory])
    spec = [{"class_path": "mmgrow.layers.attention.FullAttention", "init_args": {"num_heads": 2}},
            {"class_path": "mmgrow.layers.attention.FullAttention", "init_args": {"num_heads": 1}}]
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    factories = instantiate(parser.parse_object({"mixer": spec})).mixer
    backbone = Backbone(16, 3, factories)
    assert [m.num_heads for m in backbone.mixers] == [2, 1, 2]


def test_swiglu_hidden_rounding() -> None:
    assert swiglu_hidden(96, 8 / 3) == 256  # exact multiple, no spurious round-up
    assert swiglu_hidden(32, 8 / 3) == 88   # ceil(85.33) = 86 -> 88
    assert swiglu_hidden(32, 4.0) == 128
    assert small_model().blocks[0].mlp.hidden == 88
    with pytest.raises(ValueError, match="mlp_ratio must be positive"):
        swiglu_hidden(32, 0)


def test_init_and_parameter_count() -> None:
    torch.manual_seed(1)
    model = UnifiedModel(token_space={"text": 4000}, dim=64, depth=2, init_std=0.05,
                         mixer=[functools.partial(FullAttention, qkv_bias=True), SelfInitMixer])
    model.requires_grad_(False)
    emb_std = float(model.embed.weight.std())
    assert abs(emb_std - 0.05) < 0.002, emb_std
    w = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n
                   and "mixer.proj" not in n])
    assert abs(float(w.std()) - 0.05) < 0.002 and abs(float(w.mean())) < 0.002
    attn = model.blocks[0].mixer
    assert torch.equal(attn.q_proj.bias, torch.zeros_like(attn.q_proj.bias))
    assert torch.equal(model.norm.weight, torch.ones(64))
    own = model.blocks[1].mixer
    assert own.init_calls == [0.05] and bool((own.proj.weight == 0.5).all()) and bool((own.proj.bias == 0.25).all())

    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total - 2 * 4000 * 64


# --------------------------------------------------------------------------------------------------
# RMSNorm and SwiGLU against their formulas
# --------------------------------------------------------------------------------------------------


def test_rmsnorm_formula_and_half_precision() -> None:
    from mmgrow.layers.norm import RMSNorm

    torch.manual_seed(2)
    norm = RMSNorm(8, eps=1e-6).double().requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, dtype=torch.float64))
    x = torch.randn(3, 5, 8, dtype=torch.float64) * 7
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-12)
    # bf16 in, bf16 out, statistics in float32: within bf16 rounding of the exact result
    y = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    exact = x.to(torch.bfloat16).double() / torch.sqrt((x.to(torch.bfloat16).double() ** 2).mean(-1, keepdim=True)) \
        * norm.weight.double()
    assert float(((y.double() - exact).abs() / exact.abs().clamp_min(1e-3)).max()) < 2**-7
    with pytest.raises(ValueError, match="expected last dimension 8"):
        norm(torch.randn(2, 4, dtype=torch.bfloat16))


def test_swiglu_formula() -> None:
    from mmgrow.layers.mlp import SwiGLU

    torch.manual_seed(3)
    mlp = SwiGLU(6, 16).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    gate = x @ mlp.w_gate.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ mlp.w_up.weight.T)) @ mlp.w_down.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-12)
    assert mlp.residual_outputs() == [mlp.w_down]
