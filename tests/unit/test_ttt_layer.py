"""TTT-Linear / TTT-MLP layers: the conformance suite, the video flavour (non-causal, forward ==
reference, refusals), flavour flags, kernels, state handling, RoPE modulo the mini-batch, inits."""

from __future__ import annotations

import itertools
from dataclasses import fields

import pytest
import torch
from torch import Tensor

import mmgrow.layers.ttt as ttt_module
from mmgrow.layers.ttt import TTTMLP, TTTLayer, TTTLinear, TTTState
from mmgrow.protocols import MixerCapabilityError, SeqContext
from mmgrow.testing.conformance import packed_context

F64 = torch.float64
TOL = 1e-10
DIM = 32
CLASSES = [TTTLinear, TTTMLP]


def build(cls: type[TTTLayer], seed: int = 0, dtype: torch.dtype = F64, **kw: object) -> TTTLayer:
    torch.manual_seed(seed)
    layer = cls(dim=DIM, num_heads=4, **{"mini_batch_size": 4, **kw})
    with torch.no_grad():  # move the learned inner parameters away from their symmetric inits
        for name, p in layer.named_parameters():
            if name.startswith(("ttt_norm", "token_offsets", "lr_gate_bias", "b1", "b2", "q_proj.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return layer.to(dtype)


def randn(*shape: int, seed: int = 1, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def state_tensors(state: TTTState) -> dict[str, Tensor]:
    return {f.name: getattr(state, f.name) for f in fields(state) if getattr(state, f.name) is not None}


def outputs_state_grads(layer: TTTLayer, forward: str, x: Tensor, ctx: SeqContext, state: TTTState | None = None
                        ) -> tuple[Tensor, dict[str, Tensor], tuple]:
    x = x.clone().requires_grad_(True)
    y, new_state = getattr(layer, forward)(x, ctx, state)
    tensors = state_tensors(new_state)
    loss = (y * randn(*y.shape, seed=5)).sum()
    for i, t in enumerate(tensors.values()):
        if t.is_floating_point():
            loss = loss + (t * randn(*t.shape, seed=6 + i)).sum()
    return y, tensors, torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)


def assert_forward_equals_reference(layer: TTTLayer, x: Tensor, ctx: SeqContext, state: TTTState | None = None) -> None:
    y, s, g = outputs_state_grads(layer, "forward", x, ctx, state)
    y_ref, s_ref, g_ref = outputs_state_grads(layer, "reference_forward", x, ctx, state)
    assert (y - y_ref).abs().max() <= TOL
    assert s.keys() == s_ref.keys()
    for key in s:
        assert (s[key].double() - s_ref[key].double()).abs().max() <= TOL, key
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, g, g_ref, strict=True):
        if state is not None and name in ("W1", "b1", "W2", "b2"):  # the carried state replaces W0
            assert a is None and b is None, name
            continue
        assert a is not None and b is not None, name
        assert (a - b).abs().max() <= TOL, f"gradient of {name}: {(a - b).abs().max():.3g}"
        assert a.abs().max() > 0, f"gradient of {name} is zero"


# --------------------------------------------------------------------------------------------------
# Conformance (LM flavour, the class default)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_lm_chunks_at_and_inside_minibatch_boundaries_equal_one_pass(cls: type[TTTLayer]) -> None:
    layer = build(cls)
    x = randn(2, 12, DIM)
    for ctx in (SeqContext.simple(2, 12), packed_context([[7, 5], [2, 10]], 12, causal=True)):
        with torch.no_grad():
            y_full, s_full = layer(x, ctx)
            state, ys = layer.init_state(2, "cpu", F64), []
            for start, end in itertools.pairwise([0, 4, 6, 9, 12]):  # 4: boundary, 6 and 9: inside
                y, state = layer(x[:, start:end], ctx.slice(start, end), state)
                ys.append(y)
        assert (torch.cat(ys, dim=1) - y_full).abs().max() <= TOL
        for key, value in state_tensors(s_full).items():
            assert (state_tensors(state)[key].double() - value.double()).abs().max() <= TOL, key


# --------------------------------------------------------------------------------------------------
# Video flavour
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("flavour", ["lm", "video"])
def test_forward_equals_reference(cls: type[TTTLayer], flavour: str) -> None:
    """Outputs, returned state and every gradient (x, projections, lr gate, token offsets, W0, norms)
    against the per-token autograd reference, with perturbed (non-initial) inner parameters."""
    layer = build(cls, flavour=flavour)
    causal = flavour == "lm"
    x = randn(2, 10, DIM)  # 10 tokens: mini-batches of 4, 4 and a remainder of 2
    assert_forward_equals_reference(layer, x, SeqContext.simple(2, 10, causal=causal))
    assert_forward_equals_reference(layer, x, packed_context([[6, 3], [9]], 10, causal=causal))
    with torch.no_grad():
        _, state = layer(x[:, :8], SeqContext.simple(2, 8, causal=causal))
    assert_forward_equals_reference(layer, x[:, 8:], SeqContext.simple(2, 2, causal=causal, offset=8), state)
    if causal:  # the LM flavour also continues inside a mini-batch
        with torch.no_grad():
            _, state = layer(x[:, :5], SeqContext.simple(2, 5, causal=causal))
        assert_forward_equals_reference(layer, x[:, 5:], SeqContext.simple(2, 5, offset=5), state)


@pytest.mark.parametrize("cls", CLASSES)
def test_video_is_noncausal_inside_a_minibatch_and_refuses_causal_contexts(cls: type[TTTLayer]) -> None:
    layer = build(cls, flavour="video")
    assert not layer.causal_only and cls.causal_only
    x = randn(1, 8, DIM)
    with pytest.raises(MixerCapabilityError, match="causal"):
        layer(x, SeqContext.simple(1, 8))
    ctx = SeqContext.simple(1, 8, causal=False)
    y, _ = layer(x, ctx)
    later = x.clone()
    later[:, 3] += 1.0  # last token of the first mini-batch changes the outputs of its first token ...
    y2, _ = layer(later, ctx)
    assert (y2[:, 0] - y[:, 0]).abs().max() > 1e-6
    later = x.clone()
    later[:, 4:] += 1.0  # ... but not the past of a later mini-batch
    y3, _ = layer(later, ctx)
    assert (y3[:, :4] - y[:, :4]).abs().max() == 0
    with pytest.raises(MixerCapabilityError):  # the LM flavour is causal-only
        build(cls)(x, ctx)


@pytest.mark.parametrize("cls", CLASSES)
def test_video_state_continues_only_at_minibatch_boundaries(cls: type[TTTLayer]) -> None:
    layer = build(cls, flavour="video")
    x = randn(2, 12, DIM)
    ctx = SeqContext.simple(2, 12, causal=False)
    with torch.no_grad():
        y_full, _ = layer(x, ctx)
        y_a, state = layer(x[:, :8], ctx.slice(0, 8))
        y_b, _ = layer(x[:, 8:], ctx.slice(8, 12), state)
        assert (torch.cat([y_a, y_b], dim=1) - y_full).abs().max() <= TOL
        _, mid = layer(x[:, :6], ctx.slice(0, 6))
        with pytest.raises(ValueError, match="mini-batch boundary"):
            layer(x[:, 6:], ctx.slice(6, 12), mid)
        _, mid = layer(x[:, :1], ctx.slice(0, 1), layer.init_state(2, "cpu", F64))
        with pytest.raises(ValueError, match="mini-batch boundary"):  # so decoding needs b = 1
            layer(x[:, 1:2], ctx.slice(1, 2), mid)


@pytest.mark.parametrize("cls", CLASSES)
def test_video_packed_rows_equal_separate(cls: type[TTTLayer]) -> None:
    layer = build(cls, flavour="video")
    x = randn(1, 12, DIM)
    with torch.no_grad():
        y, _ = layer(x, packed_context([[7, 5]], 12, causal=False))
        for start, end in ((0, 7), (7, 12)):
            y_alone, _ = layer(x[:, start:end], SeqContext.simple(1, end - start, causal=False))
            assert (y[:, start:end] - y_alone).abs().max() <= TOL


# --------------------------------------------------------------------------------------------------
# Flags, kernels, states
# --------------------------------------------------------------------------------------------------


def test_flavour_presets_and_overrides() -> None:
    lm_linear, lm_mlp = TTTLinear(dim=DIM), TTTMLP(dim=DIM)
    assert (lm_linear.mini_batch_size, lm_linear.base_lr, lm_mlp.mini_batch_size, lm_mlp.base_lr) == (16, 1.0, 16, 0.1)
    assert lm_linear.rope is not None and lm_linear.token_offsets is not None and lm_linear.q_proj.bias is None
    video_linear, video_mlp = TTTLinear(dim=DIM, flavour="video"), TTTMLP(dim=DIM, flavour="video")
    assert (video_linear.mini_batch_size, video_linear.base_lr) == (16, 1.0)
    assert (video_mlp.mini_batch_size, video_mlp.base_lr) == (64, 0.1)
    assert video_mlp.rope is None and video_mlp.token_offsets is None and video_mlp.q_proj.bias is not None
    assert video_mlp.qk_l2norm and video_mlp.normalized_target and not video_mlp.causal_in_minibatch
    mixed = TTTMLP(dim=DIM, flavour="video", causal_in_minibatch=True, token_scale="inverse_position",
                   mini_batch_size=8, base_lr=0.5)
    assert mixed.causal_only and mixed.token_offsets is not None and mixed.token_offsets.shape == (8,)
    assert (mixed.mini_batch_size, mixed.base_lr) == (8, 0.5)
    mixed(randn(1, 5, DIM, dtype=torch.float32), SeqContext.simple(1, 5))  # causal contexts are fine now
    for bad in ({"flavour": "audio"}, {"kernel": "fast"}, {"token_scale": "1/t"}, {"mini_batch_size": 0},
                {"num_heads": 5}, {"base_lr": -1.0}):
        with pytest.raises(ValueError):
            TTTLinear(dim=DIM, **bad)


@pytest.mark.parametrize("cls", CLASSES)
def test_primal_kernel_equals_dual_and_auto_uses_primal_only_for_single_tokens(
        cls: type[TTTLayer], monkeypatch: pytest.MonkeyPatch) -> None:
    x = randn(2, 10, DIM)
    ctx = SeqContext.simple(2, 10, offset=1)
    with torch.no_grad():
        y_dual, _ = build(cls, kernel="dual")(x, ctx)
        y_primal, _ = build(cls, kernel="primal")(x, ctx)
    assert (y_dual - y_primal).abs().max() <= TOL
    calls: list[str] = []
    for name in ("ttt_dual", "ttt_primal"):
        real = getattr(ttt_module, name)
        monkeypatch.setattr(ttt_module, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name),
                                                                                      _real(*a, **kw))[1])
    layer = build(cls)
    _, state = layer(x[:, :5], ctx.slice(0, 5))
    _, state = layer(x[:, 5:6], ctx.slice(5, 6), state)
    layer(x[:, 6:], ctx.slice(6, 10), state)  # continues a partial mini-batch: still the dual form
    assert calls == ["ttt_dual", "ttt_primal", "ttt_dual"]


@pytest.mark.parametrize("cls", CLASSES)
def test_state_checks_and_size(cls: type[TTTLayer]) -> None:
    layer = build(cls)
    x = randn(2, 6, DIM)
    _, state = layer(x, SeqContext.simple(2, 6))
    per_example = sum(t[0].numel() for t in state_tensors(state).values())
    assert layer.state_size(6) == layer.state_size(10_000) == per_example
    with pytest.raises(ValueError, match="positions"):  # the state expects position 6 next
        layer(x[:, :1], SeqContext.simple(2, 1, offset=8), state)
    with pytest.raises(ValueError, match="W1"):
        layer(x, SeqContext.simple(2, 6), TTTState(**{**state_tensors(state), "W1": state.W1[:1]}))
    with pytest.raises(TypeError):
        layer(x, SeqContext.simple(2, 6), object())  # type: ignore[arg-type]
    new_segment = SeqContext(positions=torch.zeros(2, 1, dtype=torch.long), segment_ids=torch.ones(2, 1, dtype=torch.long))
    layer(x[:, :1], new_segment, state)  # a new segment restarts from W0: any position is fine


@pytest.mark.parametrize("cls", CLASSES)
def test_gate_extremes_freeze_the_state_at_w0(cls: type[TTTLayer]) -> None:
    x = randn(2, 9, DIM)
    for setting in ("lr=0", "tok=0"):
        layer = build(cls)
        cls.conformance_extremes()[setting](layer)
        with torch.no_grad():
            _, state = layer(x, SeqContext.simple(2, 9))
        assert torch.equal(state.W1, layer.W1.expand_as(state.W1)), setting
        assert torch.equal(state.b1, layer.b1.expand_as(state.b1)), setting
    layer = build(cls)
    with torch.no_grad():
        _, state = layer(x, SeqContext.simple(2, 9))
    assert not torch.equal(state.W1, layer.W1.expand_as(state.W1))  # ... which is not the default behaviour


@pytest.mark.parametrize("cls", CLASSES)
def test_rope_restarts_every_minibatch(cls: type[TTTLayer]) -> None:
    """RoPE at positions % b and mini-batches aligned by position: a fresh sequence that starts at a
    multiple of b behaves exactly like one starting at 0, and differently from one starting mid mini-batch."""
    layer = build(cls)
    x = randn(1, 10, DIM)
    with torch.no_grad():
        y0, _ = layer(x, SeqContext.simple(1, 10))
        y8, _ = layer(x, SeqContext.simple(1, 10, offset=8))
        y2, _ = layer(x, SeqContext.simple(1, 10, offset=2))
    assert (y8 - y0).abs().max() <= 1e-12
    assert (y2 - y0).abs().max() > 1e-6


@pytest.mark.parametrize("cls", CLASSES)
def test_float32_close_to_float64_reference(cls: type[TTTLayer]) -> None:
    """Layer in float32 vs its float64 per-token reference: relative max error <= 1e-5 (measured ~1e-6)."""
    layer64 = build(cls)
    layer32 = build(cls, dtype=torch.float32)
    x = randn(2, 12, DIM)
    ctx = SeqContext.simple(2, 12)
    with torch.no_grad():
        y64, _ = layer64.reference_forward(x, ctx)
        y32, _ = layer32(x.float(), ctx)
    assert (y32.double() - y64).abs().max() / y64.abs().max() <= 1e-5


@pytest.mark.parametrize("cls", CLASSES)
def test_init_weights(cls: type[TTTLayer]) -> None:
    layer = cls(dim=64, num_heads=4, flavour="video")
    layer.init_weights(0.5)
    with torch.no_grad():
        assert abs(float(layer.q_proj.weight.std()) - 0.5) < 0.05 and float(layer.q_proj.bias.abs().max()) == 0
        assert abs(float(layer.W1.std()) - 0.02) < 0.004 and float(layer.b1.abs().max()) == 0
        assert abs(float(layer.lr_gate_weight.std()) - 0.02) < 0.004 and float(layer.lr_gate_bias.abs().max()) == 0
    assert torch.equal(layer.ttt_norm_weight, torch.ones(4, 16)) and torch.equal(layer.post_norm.weight, torch.ones(64))
    assert layer.residual_outputs() == [layer.o_proj]


@pytest.mark.parametrize("cls", CLASSES)
def test_right_padding_without_segment_ids_leaves_real_tokens_alone(cls: type[TTTLayer]) -> None:
    """Objectives drop segment ids for one-example rows with right padding (positions 0 there): the
    restart of the positions starts a new example, so the real tokens equal the unpadded row."""
    layer = build(cls)
    x = randn(1, 10, DIM, seed=4)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 0, 0]])
    y, _ = layer(x, SeqContext(positions=positions))
    alone, _ = layer(x[:, :7], SeqContext.simple(1, 7))
    torch.testing.assert_close(y[:, :7], alone, rtol=0, atol=1e-12)
