"""Depth growth, stacking, added branches, context extension and freezing: the properties the
conformance sweep does not cover (placement, gradients, the adaLN-single trap, parameter counts,
the G_stack timing rule, freezing over training steps, errors)."""

from __future__ import annotations

import functools

import pytest
import torch

from mmgrow.growth.add_condition import AddTextConditionGrowth
from mmgrow.growth.add_memory import AddMemoryGrowth
from mmgrow.growth.base import GrowthError, zero_residual_outputs
from mmgrow.growth.check import probe_context
from mmgrow.growth.context import ExtendContextGrowth
from mmgrow.growth.depth import InsertDepthGrowth, insert_sources
from mmgrow.growth.freezing import apply_freezing
from mmgrow.growth.stack import StackGrowth, gstack_growth_tokens
from mmgrow.layers.attention import FullAttention
from mmgrow.layers.mamba2 import Mamba2
from mmgrow.models.backbone import Backbone
from mmgrow.testing.growth import tiny_model
from mmgrow.testing.growth_conformance import build_model

ATTN = functools.partial(FullAttention, num_heads=4)


def _ar(depth=4, mixer=ATTN, seed=0, dtype=torch.float32):
    return tiny_model(mixer, dtype, depth, seed)


def _ids(seed=1):
    return torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(seed))


def _hidden(model, ctx=None):
    ctx = ctx if ctx is not None else probe_context(model, 2, 16)
    return model(_ids(), ctx).hidden


def test_insert_sources_follow_llama_pro():
    assert insert_sources(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]  # a copy after every 4th of 32 blocks
    assert insert_sources(4, 2) == [1, 3]
    assert insert_sources(5, 2) == [2, 4]
    assert insert_sources(3, 5) == [0, 1, 1, 2, 2]


@pytest.mark.parametrize(("placement", "expected"), [
    ("insert", [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]),
    ("prefix", [(0, True), (1, True), (0, False), (1, False), (2, False), (3, False)]),
    ("suffix", [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)]),
])
def test_placements(placement, expected):
    assert InsertDepthGrowth(2, placement).plan(4) == expected


def test_new_blocks_are_copies_of_their_neighbour_with_zeroed_outputs():
    model = _ar()
    InsertDepthGrowth(2, "insert").apply(model)
    blocks = model.blocks
    for src, new in ((1, 2), (4, 5)):
        assert blocks[new] is not blocks[src]
        zeroed = {id(p) for lin in blocks[new].residual_outputs() for p in lin.parameters()}
        for (name, p), (_, q) in zip(blocks[new].named_parameters(), blocks[src].named_parameters(), strict=True):
            if id(p) in zeroed:
                assert bool((p == 0).all()), name
            else:
                assert torch.equal(p, q), name
    assert [b.mixer.layer_idx for b in blocks] == list(range(6))


def test_parameter_count_matches_analytic_count():
    model = _ar(depth=4)
    d, h = 32, model.backbone.mlp_hidden
    per_block = 4 * d * d + 3 * d * h + 2 * d  # q, k, v, o + SwiGLU + two RMSNorm gains
    before = model.num_parameters()
    InsertDepthGrowth(3).apply(model)
    assert model.num_parameters() - before == 3 * per_block
    StackGrowth(2).apply(model)
    assert model.num_parameters() - before == 3 * per_block + 7 * per_block


def _dit(kind):
    return build_model(ATTN, f"dit_{kind}", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaln_single_trap_zeroing_gates_is_not_enough(dtype):
    """Under adaLN-single a block's gate is table + shared projection, and the cross-attention is
    ungated: a copy with zeroed gate entries still changes the output; zeroed outputs do not."""
    base = _dit("adaln_single").to(dtype)
    ctx = probe_context(base, 2, 16, causal=False, dtype=dtype)
    x = torch.randn(2, 16, 32, dtype=dtype)
    y0 = base(x, ctx)[0]

    gates_only = _dit("adaln_single").to(dtype)
    InsertDepthGrowth(1, sources=[1]).apply(gates_only)
    new = gates_only.blocks[2]
    with torch.no_grad():  # undo the output zeroing, zero only the gate table entries instead
        for lin, ref in zip(new.residual_outputs(), gates_only.blocks[1].residual_outputs(), strict=True):
            lin.load_state_dict(ref.state_dict())
        for g in new.modulation.gate_parameters():
            g.zero_()
    assert not torch.equal(gates_only(x, ctx)[0], y0)

    zeroed = _dit("adaln_single").to(dtype)
    InsertDepthGrowth(1, sources=[1]).apply(zeroed)
    assert torch.equal(zeroed(x, ctx)[0], y0)


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    bb = Backbone(32, 2, ATTN, modulation={"kind": "adaln_zero", "cond_dim": 16}).eval()
    ctx = probe_context(bb, 2, 16, causal=False)
    x = torch.randn(2, 16, 32)
    assert torch.equal(bb(x, ctx)[0], x)


@pytest.mark.parametrize("mixer", [ATTN, functools.partial(Mamba2, **Mamba2.conformance_kwargs())], ids=["full", "mamba2"])
def test_gradients_after_depth_growth(mixer):
    """One backward: only the zeroed output projections of new blocks get non-zero gradients; after
    one SGD step the next backward reaches every parameter of the new blocks, and they move
    (float64: in float32 the first updates of a norm gain near 1.0 can round away)."""
    model = _ar(depth=2, mixer=mixer, dtype=torch.float64)
    report = InsertDepthGrowth(1).apply(model)
    new = {n: p for n, p in model.named_parameters() if n in report.new_parameters}
    outputs = {id(p) for lin in model.blocks[2].residual_outputs() for p in lin.parameters()}
    start = {n: p.detach().clone() for n, p in new.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    model(_ids(), probe_context(model, 2, 16)).hidden.pow(2).mean().backward()
    for n, p in new.items():
        nonzero = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert nonzero == (id(p) in outputs and not n.endswith("bias")), n
    opt.step()
    opt.zero_grad()
    model(_ids(2), probe_context(model, 2, 16)).hidden.pow(2).mean().backward()
    assert all(bool(p.grad.abs().sum() > 0) for p in new.values())
    opt.step()
    for n, p in new.items():
        assert not torch.equal(p.detach(), start[n]), f"{n} did not move in two steps"


def test_stack_repeats_the_stack_and_changes_the_function():
    model = _ar(depth=3)
    y0 = _hidden(model)
    report = StackGrowth(2).apply(model)
    assert report.preserves == "none" and model.backbone.depth == 6
    for i in range(3):
        for p, q in zip(model.blocks[i].parameters(), model.blocks[i + 3].parameters(), strict=True):
            assert torch.equal(p, q) and p is not q
    assert not torch.allclose(_hidden(model), y0)


def test_gstack_timing_rule_matches_the_authors_table():
    assert gstack_growth_tokens(7e9, 6 * 7e9 * 2e12) == pytest.approx(11.11e9, rel=2e-3)
    assert gstack_growth_tokens(8e9, 6 * 8e9 * 15e12) == pytest.approx(6.58e9, rel=2e-3)
    with pytest.raises(ValueError, match="params > 0"):
        gstack_growth_tokens(0, 1e20)


def test_add_memory_exact_at_zero_and_moving_at_tttvideo_gate():
    ttt = {"class_path": "ttt_linear", "init_args": {"num_heads": 2, "mini_batch_size": 4}}
    model = _ar(depth=2)
    y0 = _hidden(model)
    assert AddMemoryGrowth(ttt, layers=[-1]).apply(model).preserves == "exact"
    assert model.blocks[0].memory is None and model.blocks[1].memory is not None
    assert torch.equal(_hidden(model), y0)
    other = _ar(depth=2)
    report = AddMemoryGrowth(ttt, gate_init=0.1).apply(other)
    assert report.preserves == "none" and not torch.allclose(_hidden(other), y0)
    with pytest.raises(GrowthError, match="already have a memory"):
        AddMemoryGrowth(ttt).apply(other)
    with pytest.raises(ValueError, match="registered mixer or memory"):
        AddMemoryGrowth({"class_path": "no_such_memory"})


@pytest.mark.parametrize("gated", [False, True])
def test_add_text_condition_exact_for_any_condition_and_then_learns(gated):
    model = _ar(depth=2)
    y0 = _hidden(model)
    AddTextConditionGrowth(cond_dim=12, num_heads=2, gated=gated).apply(model)
    for seed in (0, 1):  # any text features: the new branch adds exactly 0
        ctx = probe_context(model, 2, 16, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(_hidden(model, ctx), y0)
    branch = model.blocks[0].cross_attentions[0]
    assert (branch.gate is not None) == gated
    if gated:  # the projection keeps its random init; the gate holds the branch at 0
        assert branch.attention.out_proj.weight.abs().sum() > 0
    ctx = probe_context(model, 2, 16)
    model(_ids(), ctx).hidden.pow(2).mean().backward()
    trained = branch.gate if gated else branch.attention.out_proj.weight
    assert trained.grad.abs().sum() > 0


def test_two_conditions_per_block_and_duplicate_source_error():
    model = _ar(depth=2)
    AddTextConditionGrowth(cond_dim=12, num_heads=2).apply(model)
    AddTextConditionGrowth(cond_dim=20, num_heads=2, source="llm").apply(model)
    assert [b.source for b in model.blocks[0].cross_attentions] == [None, "llm"]
    with pytest.raises(GrowthError, match="already read source='llm'"):
        AddTextConditionGrowth(cond_dim=20, source="llm").apply(model)
    ctx = probe_context(model, 2, 16)
    ctx.conditions = None
    with pytest.raises(ValueError, match="no entry 'llm'"):
        model(_ids(), ctx)


def test_extend_context_sets_theta_and_changes_attention_only():
    model = _ar(depth=2)
    y0 = _hidden(model)
    report = ExtendContextGrowth(rope_theta=1e6).apply(model)
    assert report.preserves == "none" and all(b.mixer.rope_theta == 1e6 for b in model.blocks)
    assert not torch.allclose(_hidden(model), y0)
    ssm = _ar(depth=1, mixer=functools.partial(Mamba2, **Mamba2.conformance_kwargs()))
    assert ExtendContextGrowth(rope_theta=1e6).apply(ssm).preserves == "exact"


def test_freezing_keeps_frozen_parameters_bit_identical_over_training_steps():
    model = _ar(depth=2)
    report = InsertDepthGrowth(1).apply(model)
    frozen = apply_freezing(model, "new", report.new_parameters)
    assert set(frozen) == {n for n, _ in model.named_parameters()} - set(report.new_parameters)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(4):
        opt.zero_grad()
        model(_ids(step), probe_context(model, 2, 16)).hidden.pow(2).mean().backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], snapshot[n]) for n in frozen)
    assert any(not torch.equal(params[n], snapshot[n]) for n in report.new_parameters)
    assert apply_freezing(model, r"blocks\.0\.", []) and all(
        p.requires_grad == (".blocks.0." in n) for n, p in model.named_parameters())
    assert apply_freezing(model, "all") == []
    with pytest.raises(GrowthError, match="matches no parameter"):
        apply_freezing(model, "nothing_like_this")
    with pytest.raises(GrowthError, match="created no parameters"):
        apply_freezing(model, "new", [])


def test_bad_arguments_are_named():
    with pytest.raises(GrowthError, match="count must be a positive int"):
        InsertDepthGrowth(0)
    with pytest.raises(GrowthError, match="placement must be one of"):
        InsertDepthGrowth(1, "middle")
    with pytest.raises(GrowthError, match="not a block index"):
        InsertDepthGrowth(1, sources=[7]).apply(_ar(depth=2))
    with pytest.raises(GrowthError, match="factor must be an int >= 2"):
        StackGrowth(1)
    with pytest.raises(GrowthError, match="UnifiedModel or a Backbone"):
        InsertDepthGrowth(1).apply(torch.nn.Linear(2, 2))


def test_zeroing_refuses_a_branch_without_declared_outputs():
    model = _ar(depth=1)
    model.blocks[0].mlp.residual_outputs = list
    with pytest.raises(GrowthError, match="branch 'mlp'.*declares no residual_outputs"):
        zero_residual_outputs(model.blocks[0])
