"""Masked structural growth (mmgrow.growth.msg) and its ramp (mmgrow.training.growth_ramp)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from mmgrow.growth.base import GrowthError
from mmgrow.growth.msg import MaskedGrowth
from mmgrow.growth.width import Net2WiderGrowth
from mmgrow.layers.attention import FullAttention
from mmgrow.layers.blockwise import BlockwiseAttention
from mmgrow.layers.mamba2 import Mamba2
from mmgrow.layers.sliding_window import SlidingWindowAttention
from mmgrow.models.growth_mask import GrowthMask
from mmgrow.models.unified import UnifiedModel
from mmgrow.protocols import SeqContext
from mmgrow.testing.growth import relative_error, tiny_model, token_inputs
from mmgrow.training.growth_ramp import GrowthMaskRamp, set_growth_masks

D, VOCAB, B, T = 32, 50, 2, 9

MIXERS = {
    "full-gqa": functools.partial(FullAttention, num_heads=4, num_kv_heads=2, qkv_bias=True),
    "sliding-gqa": functools.partial(SlidingWindowAttention, num_heads=4, num_kv_heads=2, window=3),
    "blockwise": functools.partial(BlockwiseAttention, num_heads=4, query_block=4, key_block=3),
}


def build(mixer: str = "full-gqa", dtype: torch.dtype = torch.float32, depth: int = 2, seed: int = 0) -> UnifiedModel:
    return tiny_model(MIXERS[mixer], dtype, depth, seed, dim=D, vocab=VOCAB)


def inputs(seed: int = 1) -> tuple[torch.Tensor, SeqContext]:
    return token_inputs(B, T, VOCAB, seed)


rel_err = relative_error


# -------------------------------------------------------------------------------------------- depth


@pytest.mark.parametrize(("placement", "new_at"), [("insert", [2, 5]), ("prefix", [0, 1]), ("suffix", [4, 5])])
@pytest.mark.parametrize("init", ["random", "copy"])
def test_depth_at_mask_zero_is_bit_exact(placement: str, new_at: list[int], init: str) -> None:
    ids, ctx = inputs()
    for dtype in (torch.float32, torch.float64):
        model = build(dtype=dtype, depth=4)
        old = list(model.blocks)
        before = model(ids, ctx).hidden
        report = MaskedGrowth(depth=2, placement=placement, init=init).apply(model)
        assert report.preserves == "exact"
        assert torch.equal(model(ids, ctx).hidden, before)
        assert [i for i, b in enumerate(model.blocks) if b.growth_mask is not None] == new_at
        assert [b for b in model.blocks if b.growth_mask is None] == old  # the originals, in order
        assert [b.mixer.layer_idx for b in model.blocks] == list(range(6))
        source = {"insert": [1, 3], "prefix": [0, 1], "suffix": [2, 3]}[placement]
        for i, s in zip(new_at, source, strict=True):
            same = torch.equal(model.blocks[i].mlp.w_up.weight, old[s].mlp.w_up.weight)
            assert same == (init == "copy")
        # Every parameter of the new blocks, and nothing else, is reported.
        assert sorted(report.new_parameters) == sorted(
            f"backbone.blocks.{i}.{n}" for i in new_at for n, _ in model.blocks[i].named_parameters())



# -------------------------------------------------------------------------------------------- width


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_width_at_mask_zero_within_tolerance_whatever_the_seed(mixer: str) -> None:
    ids, ctx = inputs()
    heads = 4 if "gqa" in mixer else 2
    for dtype, bound in ((torch.float32, MaskedGrowth.tolerance), (torch.float64, 1e-12)):
        before = build(mixer, dtype)(ids, ctx).hidden
        outs, weights = [], []
        for seed in (0, 1):
            model = build(mixer, dtype)
            report = MaskedGrowth(ffn=8, heads=heads, seed=seed).apply(model)
            assert report.preserves == "tolerance"
            outs.append(model(ids, ctx).hidden)
            weights.append(model.blocks[0].mlp.w_up.weight[-8:].detach().clone())
            assert rel_err(outs[-1], before) <= bound
            set_growth_masks(model, 1.0)
            assert rel_err(model(ids, ctx).hidden, before) > 1e-3  # the new units now take part
        assert not torch.equal(weights[0], weights[1])
        assert torch.equal(outs[0], outs[1])  # new weights times an exact 0


def test_mask_interpolates_between_base_and_grown() -> None:
    """FFN units grown in the last block only: the backbone output is ``y0 + m * d`` exactly, so the
    ramp's midpoint is the midpoint of the outputs, strictly between them."""
    model = build(dtype=torch.float64)
    ids, ctx = inputs()
    MaskedGrowth(ffn=16, layers=[-1]).apply(model)
    x = model.embed(ids)

    def out(m: float) -> torch.Tensor:
        assert set_growth_masks(model, m) == 1
        return model.backbone(x, ctx)[0].detach()

    y0, y_half, y1 = out(0.0), out(0.5), out(1.0)
    moved = (y1 - y0).abs() > 1e-9
    assert moved.float().mean() > 0.9
    torch.testing.assert_close(y_half, (y0 + y1) / 2, rtol=0, atol=1e-12)
    lo, hi = torch.minimum(y0, y1), torch.maximum(y0, y1)
    assert bool(((y_half > lo) & (y_half < hi))[moved].all())
    # Depth: not linear in m (later branches see the changed stream), but continuous and in between.
    deep = build(dtype=torch.float64)
    MaskedGrowth(depth=1, placement="suffix").apply(deep)
    h = {m: (set_growth_masks(deep, m), deep(ids, ctx).hidden.detach())[1] for m in (0.0, 0.5, 1.0)}
    d_half, d_full = (h[0.5] - h[0.0]).norm(), (h[1.0] - h[0.0]).norm()
    assert 0 < d_half < d_full and (h[1.0] - h[0.5]).norm() > 0


def test_gradients_of_new_structures_are_zero_at_mask_zero_and_flow_after() -> None:
    model = build(depth=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    MaskedGrowth(depth=1, ffn=4, heads=4, layers=[0], placement="suffix").apply(model)
    ids, ctx = inputs()
    hd = model.blocks[0].mixer.head_dim

    def grads(m: float) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        set_growth_masks(model, m)
        model(ids, ctx).hidden.square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    g = grads(0.0)
    new_block = [n for n in g if n.startswith("backbone.blocks.2.")]
    assert new_block and all(g[n] is not None and not g[n].any() for n in new_block)
    mlp, att = "backbone.blocks.0.mlp", "backbone.blocks.0.mixer"
    new_slices = [g[f"{mlp}.w_up.weight"][-4:], g[f"{mlp}.w_gate.weight"][-4:], g[f"{mlp}.w_down.weight"][:, -4:],
                  g[f"{att}.q_proj.weight"][-4 * hd:], g[f"{att}.k_proj.weight"][-2 * hd:],
                  g[f"{att}.v_proj.bias"][-2 * hd:], g[f"{att}.out_proj.weight"][:, -4 * hd:]]
    assert all(not s.any() for s in new_slices)
    old_slices = [g[f"{mlp}.w_up.weight"][:-4], g[f"{att}.q_proj.weight"][:-4 * hd], g["embed.weight"]]
    assert all(s.abs().sum() > 0 for s in old_slices)
    # Once the ramp leaves 0, everything new trains.
    g = grads(0.25)
    assert all(g[n].abs().sum() > 0 for n in new_block)
    assert all(s.abs().sum() > 0 for s in (g[f"{mlp}.w_up.weight"][-4:], g[f"{att}.k_proj.weight"][-2 * hd:],
                                           g[f"{att}.out_proj.weight"][:, -4 * hd:]))
    # Growth kept every old weight: unchanged tensors, and the old slices of the widened ones.
    params = dict(model.named_parameters())
    for n, p in base.items():
        assert torch.equal(params[n].detach()[tuple(slice(0, k) for k in p.shape)], p)


def test_report_lists_exactly_the_new_and_resized_parameters() -> None:
    model = build(depth=3)
    report = MaskedGrowth(depth=1, ffn=2, heads=2, layers=[1]).apply(model)  # insert after block 2 -> index 3
    width = [f"backbone.blocks.1.mlp.{w}.weight" for w in ("w_gate", "w_up", "w_down")]
    width += [f"backbone.blocks.1.mixer.{p}.{k}" for p in ("q_proj", "k_proj", "v_proj") for k in ("weight", "bias")]
    width += ["backbone.blocks.1.mixer.out_proj.weight"]
    depth = [f"backbone.blocks.3.{n}" for n, _ in model.blocks[3].named_parameters()]
    assert sorted(report.new_parameters) == sorted(width + depth)
    assert report.preserves == "tolerance"


def test_replay_on_a_fresh_base_gives_the_same_structure() -> None:
    strategy = MaskedGrowth(depth=1, ffn=3, heads=4, seed=2)
    grown = build()
    strategy.apply(grown)
    set_growth_masks(grown, 0.7)
    replay = build(seed=5)
    MaskedGrowth(**strategy.init_args()).apply(replay)
    replay.load_state_dict(grown.state_dict())  # buffers too: is_new and the ramp value
    ids, ctx = inputs()
    assert torch.equal(replay(ids, ctx).hidden, grown(ids, ctx).hidden)
    values = [float(m.value) for m in replay.modules() if isinstance(m, GrowthMask)]
    assert len(values) == 7 and values == [pytest.approx(0.7)] * 7  # 2 x (ffn, heads) + new block's 3


def test_growing_again_after_the_ramp_marks_only_the_newest_units() -> None:
    model = build(depth=1)
    MaskedGrowth(ffn=4).apply(model)
    mlp = model.blocks[0].mlp
    assert mlp.hidden_mask.is_new.tolist() == [False] * 88 + [True] * 4
    MaskedGrowth(ffn=2).apply(model)  # still at 0: old and new new units share the mask
    assert mlp.hidden_mask.is_new.tolist() == [False] * 88 + [True] * 6
    set_growth_masks(model, 0.5)
    with pytest.raises(GrowthError, match="block 0's MLP has a growth mask at 0.5, mid-ramp"):
        MaskedGrowth(ffn=2).apply(model)
    assert mlp.hidden == 94  # refused before anything changed
    set_growth_masks(model, 1.0)
    ids, ctx = inputs()
    before = model(ids, ctx).hidden
    MaskedGrowth(ffn=2).apply(model)
    assert mlp.hidden_mask.is_new.tolist() == [False] * 94 + [True] * 2 and float(mlp.hidden_mask.value) == 0.0
    assert rel_err(model(ids, ctx).hidden, before) <= MaskedGrowth.tolerance
    # Net2Net copies of masked units inherit their source's mask entry.
    Net2WiderGrowth(ffn=2, seed=0).apply(model)
    sources = [int(torch.nonzero((mlp.w_up.weight[:96] == mlp.w_up.weight[96 + j]).all(dim=1))[0]) for j in range(2)]
    assert mlp.hidden_mask.is_new[96:].tolist() == mlp.hidden_mask.is_new[sources].tolist()


def test_errors_are_named() -> None:
    with pytest.raises(GrowthError, match="nothing to grow"):
        MaskedGrowth()
    with pytest.raises(GrowthError, match=r"placement must be one of \('insert', 'prefix', 'suffix'\)"):
        MaskedGrowth(depth=1, placement="middle")
    with pytest.raises(GrowthError, match="init must be one of"):
        MaskedGrowth(depth=1, init="zeros")
    with pytest.raises(GrowthError, match="ramp_steps must be a positive int"):
        MaskedGrowth(depth=1, ramp_steps=0)
    with pytest.raises(GrowthError, match="depth must be an int >= 0, got -2"):
        MaskedGrowth(depth=-2)
    with pytest.raises(GrowthError, match="init_std must be a positive float"):
        MaskedGrowth(depth=1, init_std=0.0)
    with pytest.raises(GrowthError, match="heads=2 is not a multiple of block 0's key/value group size 4"):
        MaskedGrowth(heads=2).apply(UnifiedModel(token_space={"text": VOCAB}, dim=D, depth=1,
                                                  mixer=functools.partial(FullAttention, num_heads=4, num_kv_heads=1)))
    torch.manual_seed(0)
    mamba = UnifiedModel(token_space={"text": VOCAB}, dim=D, depth=2,
                         mixer=functools.partial(Mamba2, **Mamba2.conformance_kwargs()))
    with pytest.raises(GrowthError, match=r"mixer Mamba2 cannot grow heads.*only attention mixers"):
        MaskedGrowth(heads=2).apply(mamba)
    ids, ctx = inputs()
    before = mamba(ids, ctx).hidden
    assert MaskedGrowth(depth=1).apply(mamba).preserves == "exact"  # depth works for any mixer
    assert torch.equal(mamba(ids, ctx).hidden, before)


# -------------------------------------------------------------------------------------------- ramp


def test_ramp_callback_follows_global_step() -> None:
    model = build(depth=4)
    MaskedGrowth(depth=2, ffn=4, heads=4).apply(model)
    # 4 widened blocks (2 masks each) + 2 new blocks copied from widened neighbours (3 masks each).
    assert set_growth_masks(model, 0.0) == 14
    ramp = GrowthMaskRamp(steps=10, start_step=5)
    module = SimpleNamespace(model=model)
    for step, value in [(0, 0.0), (5, 0.0), (6, 0.1), (10, 0.5), (15, 1.0), (40, 1.0)]:
        ramp.on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        assert [float(m.value) for m in model.modules() if isinstance(m, GrowthMask)] == [pytest.approx(value)] * 14
    picked = GrowthMaskRamp.from_strategies([Net2WiderGrowth(ffn=1), MaskedGrowth(depth=1, ramp_steps=30),
                                             MaskedGrowth(depth=1, ramp_steps=7)], start_step=3)
    assert (picked.steps, picked.start_step) == (30, 3)
    assert GrowthMaskRamp.from_strategies([Net2WiderGrowth(ffn=1)]) is None
    with pytest.raises(ValueError, match="steps must be a positive int"):
        GrowthMaskRamp(steps=0)
    with pytest.raises(ValueError, match=r"value must be in \[0, 1\]"):
        set_growth_masks(model, 1.5)
