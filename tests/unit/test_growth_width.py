"""Net2Net width growth (mmgrow.growth.width) and the layer hooks it uses."""

from __future__ import annotations

import functools

import pytest
import torch

from mmgrow.growth.base import GrowthError
from mmgrow.growth.width import Net2WiderGrowth, balanced_sources
from mmgrow.layers.attention import FullAttention
from mmgrow.layers.blockwise import BlockwiseAttention
from mmgrow.layers.mamba2 import Mamba2
from mmgrow.layers.mlp import SwiGLU
from mmgrow.layers.sliding_window import SlidingWindowAttention
from mmgrow.models.unified import UnifiedModel
from mmgrow.protocols import SeqContext
from mmgrow.testing.growth import relative_error, tiny_model, token_inputs

D, VOCAB, B, T = 32, 50, 2, 9

MIXERS = {
    "full-gqa": functools.partial(FullAttention, num_heads=4, num_kv_heads=2),
    "full-bias": functools.partial(FullAttention, num_heads=4, qkv_bias=True),
    "sliding-gqa": functools.partial(SlidingWindowAttention, num_heads=4, num_kv_heads=2, window=3),
    "blockwise-gqa-bias": functools.partial(BlockwiseAttention, num_heads=4, num_kv_heads=2, qkv_bias=True,
                                            query_block=4, key_block=3),
}


def build(mixer: str, dtype: torch.dtype = torch.float32, depth: int = 2, seed: int = 0) -> UnifiedModel:
    return tiny_model(MIXERS[mixer], dtype, depth, seed, dim=D, vocab=VOCAB)


def inputs(seed: int = 1) -> tuple[torch.Tensor, SeqContext]:
    return token_inputs(B, T, VOCAB, seed)


rel_err = relative_error


def added_parameters(mixer: FullAttention, ffn: int, heads: int, grown_blocks: int) -> int:
    """Analytic count: an FFN unit is a row of W_gate and W_up and a column of W_down (3 D); a query
    head is hd rows of W_q (+ hd bias) and hd columns of W_o; its group's key/value head 2 hd rows (+ 2 hd)."""
    hd, group = mixer.head_dim, mixer.kv_group_size
    bias = mixer.q_proj.bias is not None
    per_query = 2 * hd * D + (hd if bias else 0)
    per_kv = 2 * hd * D + (2 * hd if bias else 0)
    return grown_blocks * (3 * D * ffn + heads * per_query + heads // group * per_kv)


# -------------------------------------------------------------------------------------------- preservation


@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize(("ffn", "heads", "layers"), [(8, 0, None), (0, 4, None), (100, 2, [-1])])
def test_net2wider_preserves_function_shapes_and_counts(mixer: str, ffn: int, heads: int, layers) -> None:
    ids, ctx = inputs()
    for dtype, bound in ((torch.float32, Net2WiderGrowth.tolerance), (torch.float64, 1e-12)):
        model = build(mixer, dtype)
        base_mixer = model.blocks[0].mixer
        H, Hk, hd, hidden = base_mixer.num_heads, base_mixer.num_kv_heads, base_mixer.head_dim, model.blocks[0].mlp.hidden
        before, n_before = model(ids, ctx).hidden, model.num_parameters()
        report = Net2WiderGrowth(ffn=ffn, heads=heads, layers=layers, seed=3).apply(model)
        after = model(ids, ctx).hidden
        assert report.preserves == "tolerance"
        assert rel_err(after, before) <= bound
        grown = [1] if layers else [0, 1]
        assert model.num_parameters() - n_before == added_parameters(base_mixer, ffn, heads, len(grown))
        for i, block in enumerate(model.blocks):
            extra_h, extra_f = (heads, ffn) if i in grown else (0, 0)
            att = block.mixer
            assert (att.num_heads, att.num_kv_heads) == (H + extra_h, Hk + extra_h // (H // Hk))
            assert att.q_proj.weight.shape == ((H + extra_h) * hd, D)
            assert att.k_proj.weight.shape == att.v_proj.weight.shape == (att.num_kv_heads * hd, D)
            assert att.out_proj.weight.shape == (D, (H + extra_h) * hd)
            assert block.mlp.hidden == hidden + extra_f
            assert block.mlp.w_gate.weight.shape == block.mlp.w_up.weight.shape == (hidden + extra_f, D)
            assert block.mlp.w_down.weight.shape == (D, hidden + extra_f)


@pytest.mark.parametrize("mixer", ["full-gqa", "sliding-gqa", "blockwise-gqa-bias"])
def test_decoding_with_a_kv_cache_after_growth_equals_prefill(mixer: str) -> None:
    model = build(mixer, torch.float64)
    Net2WiderGrowth(ffn=5, heads=4, seed=1).apply(model)
    ids, ctx = inputs()
    full = model(ids, ctx).hidden
    states = model.init_states(B, "cpu", torch.float64)
    assert states[0].k.shape[1] == model.blocks[0].mixer.num_kv_heads == 4
    steps = []
    for t in range(T):
        out = model(ids[:, t:t + 1], ctx.slice(t, t + 1), states)
        states = out.states
        steps.append(out.hidden)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-12)


def test_copies_carry_their_sources_and_fan_out_is_divided() -> None:
    """The hooks themselves: copied rows equal the source rows, fan-out columns are divided by c."""
    torch.manual_seed(0)
    att = FullAttention(dim=D, num_heads=4, num_kv_heads=2, qkv_bias=True).double()
    q, k, b, o = (t.detach().clone() for t in (att.q_proj.weight, att.k_proj.weight, att.q_proj.bias,
                                                att.out_proj.weight))
    att.duplicate_kv_groups([1, 1])  # group 1 three times, group 0 once
    hd = att.head_dim
    torch.testing.assert_close(att.q_proj.weight[4 * hd:6 * hd], q[2 * hd:], rtol=0, atol=0)
    torch.testing.assert_close(att.q_proj.weight[6 * hd:], q[2 * hd:], rtol=0, atol=0)
    torch.testing.assert_close(att.q_proj.bias[4 * hd:6 * hd], b[2 * hd:], rtol=0, atol=0)
    torch.testing.assert_close(att.k_proj.weight[2 * hd:3 * hd], k[hd:], rtol=0, atol=0)
    torch.testing.assert_close(att.out_proj.weight[:, :2 * hd], o[:, :2 * hd], rtol=0, atol=0)
    for start in (2, 4, 6):
        torch.testing.assert_close(att.out_proj.weight[:, start * hd:(start + 2) * hd], o[:, 2 * hd:] / 3,
                                   rtol=0, atol=0)
    mlp = SwiGLU(D, 16).double()
    up, down = mlp.w_up.weight.detach().clone(), mlp.w_down.weight.detach().clone()
    mlp.duplicate_hidden(torch.tensor([5]))
    torch.testing.assert_close(mlp.w_up.weight[16], up[5], rtol=0, atol=0)
    torch.testing.assert_close(mlp.w_down.weight[:, [5, 16]], down[:, [5, 5]] / 2, rtol=0, atol=0)
    torch.testing.assert_close(mlp.w_down.weight[:, :5], down[:, :5], rtol=0, atol=0)


def test_noise_breaks_symmetry_and_still_preserves() -> None:
    ids, ctx = inputs()
    model = build("full-gqa")
    before = model(ids, ctx).hidden
    w_rms = float(model.blocks[0].mlp.w_down.weight.detach().pow(2).mean().sqrt())
    report = Net2WiderGrowth(ffn=4, heads=2, noise_std=0.5 * w_rms, seed=0).apply(model)
    assert report.preserves == "tolerance"
    assert rel_err(model(ids, ctx).hidden, before) <= Net2WiderGrowth.tolerance
    mlp = model.blocks[0].mlp
    hidden = mlp.hidden - 4
    # Replicas of one unit now differ in their outgoing columns (and their sum is the old column).
    src = [int(torch.nonzero((mlp.w_up.weight[:hidden] == mlp.w_up.weight[hidden + j]).all(dim=1))[0])
           for j in range(4)]
    for j, s in enumerate(src):
        assert not torch.equal(mlp.w_down.weight[:, s], mlp.w_down.weight[:, hidden + j])
    # Noise far above the weights' scale is reported honestly.
    loud = Net2WiderGrowth(ffn=4, noise_std=10.0).apply(build("full-gqa"))
    assert loud.preserves == "none" and "RMS" in loud.notes


# -------------------------------------------------------------------------------------------- bookkeeping


@pytest.mark.parametrize("bias", [False, True])
def test_report_lists_exactly_the_resized_parameters(bias: bool) -> None:
    model = build("full-bias" if bias else "full-gqa", depth=3)
    report = Net2WiderGrowth(ffn=2, heads=4 if bias else 2, layers=[0, 2]).apply(model)
    names = [f"backbone.blocks.{i}.mlp.{w}.weight" for i in (0, 2) for w in ("w_gate", "w_up", "w_down")]
    names += [f"backbone.blocks.{i}.mixer.{p}.{kind}" for i in (0, 2) for p in ("q_proj", "k_proj", "v_proj")
              for kind in (("weight", "bias") if bias else ("weight",))]
    names += [f"backbone.blocks.{i}.mixer.out_proj.weight" for i in (0, 2)]
    assert sorted(report.new_parameters) == sorted(names)


def test_source_choice_is_seeded_balanced_and_replay_safe() -> None:
    gen = torch.Generator().manual_seed(0)
    picks = balanced_sources(5, 12, gen)
    assert sorted(torch.bincount(picks, minlength=5).tolist()) == [2, 2, 2, 3, 3]
    assert len(set(balanced_sources(5, 4, gen).tolist())) == 4  # no source twice while there are enough
    grown = build("full-gqa")
    Net2WiderGrowth(ffn=7, heads=2, seed=4).apply(grown)
    again = build("full-gqa")
    Net2WiderGrowth(ffn=7, heads=2, seed=4).apply(again)
    for (n, a), (m, b) in zip(grown.state_dict().items(), again.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b)
    other = build("full-gqa")
    Net2WiderGrowth(ffn=7, heads=2, seed=5).apply(other)
    assert not torch.equal(other.blocks[0].mlp.w_up.weight, grown.blocks[0].mlp.w_up.weight)
    # Replay: the same strategy on a fresh base (different weights) gives the same structure, so
    # the grown weights load over it.
    replay = build("full-gqa", seed=9)
    Net2WiderGrowth(ffn=7, heads=2, seed=4).apply(replay)
    replay.load_state_dict(grown.state_dict())
    ids, ctx = inputs()
    assert torch.equal(replay(ids, ctx).hidden, grown(ids, ctx).hidden)


def test_head_growth_on_a_mamba2_model_is_refused_by_name() -> None:
    torch.manual_seed(0)
    model = UnifiedModel(token_space={"text": VOCAB}, dim=D, depth=2,
                         mixer=functools.partial(Mamba2, **Mamba2.conformance_kwargs()))
    n = model.num_parameters()
    with pytest.raises(GrowthError, match=r"block 0's mixer Mamba2 cannot grow heads.*only attention mixers"):
        Net2WiderGrowth(ffn=4, heads=2).apply(model)
    assert model.num_parameters() == n  # refused before anything changed
    ids, ctx = inputs()
    before = model(ids, ctx).hidden
    Net2WiderGrowth(ffn=4).apply(model)  # the MLP still grows
    assert rel_err(model(ids, ctx).hidden, before) <= Net2WiderGrowth.tolerance


def test_bad_arguments_are_named() -> None:
    with pytest.raises(GrowthError, match="ffn must be an int >= 0, got -1"):
        Net2WiderGrowth(ffn=-1)
    with pytest.raises(GrowthError, match="heads must be an int >= 0"):
        Net2WiderGrowth(heads=1.5)
    with pytest.raises(GrowthError, match="nothing to grow"):
        Net2WiderGrowth()
    with pytest.raises(GrowthError, match="noise_std must be a float >= 0"):
        Net2WiderGrowth(ffn=1, noise_std=-0.1)
    model = build("full-gqa")
    with pytest.raises(GrowthError, match=r"heads=3 is not a multiple of block 0's key/value group size 2"):
        Net2WiderGrowth(heads=3).apply(model)
    with pytest.raises(GrowthError, match="layer 5 is not a block index of a 2-block model"):
        Net2WiderGrowth(ffn=1, layers=[5]).apply(model)
    with pytest.raises(ValueError, match=r"source groups must lie in \[0, 2\)"):
        model.blocks[0].mixer.duplicate_kv_groups([2])
    with pytest.raises(ValueError, match=r"source units must lie in \[0, 88\)"):
        model.blocks[0].mlp.duplicate_hidden([88])
    assert model.blocks[0].mixer.num_heads == 4 and model.blocks[0].mlp.hidden == 88
