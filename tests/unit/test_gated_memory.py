"""The gated memory branch: exact preservation at gate 0, bidirectional == flip-run-flip for every
registered scan mixer and memory layer, per-modality gates, decoding through the model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import mmgrow
from mmgrow.models.block import Block, BlockState
from mmgrow.models.gated_memory import GatedMemory, MemoryPlacement
from mmgrow.models.unified import UnifiedModel
from mmgrow.protocols import MaskSpec, MixerCapabilityError, SeqContext, SequenceMixer
from mmgrow.testing.conformance import build_small, packed_context

DIM = 32


class PrefixMean(SequenceMixer):
    """A toy scan: ``y_t = W_o tanh(mean of W_i x_s over s <= t in t's segment)`` (no state)."""

    causal_only = True
    supports_segments = True

    def __init__(self, *, dim: int, layer_idx: int = 0) -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        self.proj_in = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, ctx, state=None):
        self.check_context(x, ctx)
        v = self.proj_in(x)
        seg = ctx.segment_ids if ctx.segment_ids is not None else torch.zeros(x.shape[:2], dtype=torch.long)
        same = (seg[:, :, None] == seg[:, None, :]) & torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        weights = same.to(x.dtype) / same.sum(-1, keepdim=True).to(x.dtype)
        return self.proj_out(torch.tanh(weights @ v)), None


def _scan_classes() -> list:
    cases = [pytest.param(PrefixMean, id="toy-prefix-mean")]
    for kind in ("mixers", "memory"):
        for name in mmgrow.available(kind):
            cls = mmgrow.load_plugin(kind, name)
            if cls.causal_only and cls.supports_segments:
                cases.append(pytest.param(cls, id=f"{kind}-{name}"))
    return cases


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _alone(length: int, causal: bool = True) -> SeqContext:
    return SeqContext(positions=torch.arange(length)[None], mask=MaskSpec(causal=causal))


@pytest.mark.parametrize("cls", _scan_classes())
def test_bidirectional_equals_manual_flip_run_flip_per_segment(cls: type) -> None:
    memory = build_small(cls)
    branch = GatedMemory(DIM, memory, gate_init=0.3, bidirectional=True).double()
    with torch.no_grad():
        branch.gate.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        branch.gate_reverse.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    rows = [[5, 4], [3, 5]]  # row 1 ends with one padding token
    T = 9
    x = _randn(2, T, DIM, seed=3)
    with torch.no_grad():
        y, _ = branch(x, packed_context(rows, T, causal=False))
        a, b_ = torch.tanh(branch.gate[0]), torch.tanh(branch.gate_reverse[0])
        for row, lengths in enumerate(rows):
            start = 0
            for n in lengths:
                xs = x[row:row + 1, start:start + n]
                x1 = xs + a * memory(branch.norm(xs), _alone(n))[0]
                back = memory(branch.norm(x1.flip(1)), _alone(n))[0].flip(1)
                expected = x1 + b_ * back
                diff = float((y[row:row + 1, start:start + n] - expected).abs().max())
                assert diff <= 1e-10, f"row {row}, segment at {start}: bidirectional branch differs by {diff:.3g}"
                start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_zero_preserves_the_block_exactly(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    mixer = build_small(mmgrow.load_plugin("mixers", "full"), dtype)
    plain = Block(DIM, mixer, 64).to(dtype)
    gated = Block(DIM, mixer, 64, memory=GatedMemory(DIM, build_small(PrefixMean, dtype), gate_init=0.0)).to(dtype)
    gated.mlp.load_state_dict(plain.mlp.state_dict())
    x = torch.randn(2, 7, DIM, dtype=dtype)
    ctx = SeqContext.simple(2, 7)
    assert torch.equal(plain(x, ctx)[0], gated(x, ctx)[0])
    with torch.no_grad():
        gated.memory.gate.fill_(0.1)
    assert not torch.allclose(plain(x, ctx)[0], gated(x, ctx)[0])


def test_modality_gates_pick_the_token_modality_gate() -> None:
    branch = GatedMemory(DIM, build_small(PrefixMean), modality_gates=2).double()
    with torch.no_grad():
        branch.gate[0].fill_(0.0)  # modality 0: the branch is shut
        branch.gate[1].fill_(0.7)
    x = _randn(1, 6, DIM)
    modality = torch.tensor([[0, 0, 1, 1, 0, 1]])
    ctx = SeqContext(positions=torch.arange(6)[None], modality_ids=modality)
    y, _ = branch(x, ctx)
    out, _ = branch.memory(branch.norm(x), ctx)
    expected = x + torch.where(modality[..., None] == 1, torch.tanh(torch.tensor(0.7, dtype=torch.float64)) * out,
                               torch.zeros_like(out))
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="modality_ids"):
        branch(x, SeqContext.simple(1, 6))
    with pytest.raises(ValueError, match="outside the 2 modality gates"):
        branch(x, SeqContext(positions=torch.arange(6)[None], modality_ids=modality + 1))


def test_bidirectional_branch_refuses_causal_contexts_and_states() -> None:
    branch = GatedMemory(DIM, build_small(PrefixMean), bidirectional=True).double()
    x = _randn(1, 5, DIM)
    with pytest.raises(MixerCapabilityError, match="non-causal"):
        branch(x, SeqContext.simple(1, 5))
    with pytest.raises(MixerCapabilityError, match="decoding state"):
        branch.init_state(1, "cpu", torch.float64)
    assert not branch.supports_state


def test_model_with_memory_decodes_like_prefill_and_reports_residual_outputs() -> None:
    full = mmgrow.load_plugin("mixers", "full")
    torch.manual_seed(0)
    model = UnifiedModel(token_space={"text": 50}, dim=DIM, depth=3,
                         mixer=lambda dim, layer_idx: full(dim=dim, layer_idx=layer_idx, num_heads=4),
                         memory=lambda dim, layer_idx: full(dim=dim, layer_idx=layer_idx, num_heads=2),
                         memory_placement=MemoryPlacement(layers=[0, -1], gate_init=0.5)).double().eval()
    assert [b.memory is not None for b in model.blocks] == [True, False, True]
    assert all(any(p is q for q in model.residual_outputs()) for p in model.blocks[0].memory.residual_outputs())
    assert len(model.blocks[0].memory.residual_outputs()) == 1
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    ctx = SeqContext.simple(2, 8)
    with torch.no_grad():
        full_pass = model(ids, ctx).hidden
    states = model.init_states(2, "cpu", torch.float64)
    assert isinstance(states[0], BlockState) and not isinstance(states[1], BlockState)
    steps = []
    for t in range(8):
        with torch.no_grad():
            out = model(ids[:, t:t + 1], ctx.slice(t, t + 1), states)
        states = out.states
        steps.append(out.hidden)
    diff = float((torch.cat(steps, 1) - full_pass).abs().max())
    assert diff <= 1e-10, f"decoding with a memory branch differs from prefill by {diff:.3g}"


def test_generic_init_leaves_gates_at_gate_init() -> None:
    model = UnifiedModel(token_space={"text": 10}, dim=DIM, depth=2, memory=PrefixMean,
                         memory_placement={"gate_init": 0.25, "bidirectional": True})
    for block in model.blocks:
        assert torch.equal(block.memory.gate, torch.full_like(block.memory.gate, 0.25))
        assert torch.equal(block.memory.gate_reverse, torch.full_like(block.memory.gate_reverse, 0.25))
    with pytest.raises(ValueError, match="not a block index"):
        UnifiedModel(token_space={"text": 10}, dim=DIM, depth=2, memory=PrefixMean, memory_placement={"layers": [2]})


def test_video_flavour_ttt_runs_bidirectionally_in_a_noncausal_model() -> None:
    """TTT-video's use: a non-causal memory (full mini-batch gradients) in a DiT-like non-causal context;
    each pass gets the model's non-causal context and the reversed pass starts at the row's end."""
    from mmgrow.layers.ttt import TTTMLP

    torch.manual_seed(0)
    memory = TTTMLP(dim=DIM, num_heads=4, flavour="video", mini_batch_size=4).double().eval()
    branch = GatedMemory(DIM, memory, gate_init=0.5, bidirectional=True).double()
    x = _randn(1, 10, DIM, seed=4)
    with torch.no_grad():
        y, _ = branch(x, SeqContext.simple(1, 10, causal=False))
        a = torch.tanh(torch.tensor(0.5, dtype=torch.float64))
        x1 = x + a * memory(branch.norm(x), _alone(10, causal=False))[0]
        expected = x1 + a * memory(branch.norm(x1.flip(1)), _alone(10, causal=False))[0].flip(1)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    with pytest.raises(MixerCapabilityError):  # a causal model cannot host it, even forward-only
        GatedMemory(DIM, memory).double()(x, SeqContext.simple(1, 10))
