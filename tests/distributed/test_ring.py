"""Ring attention on 2, 3 and 4 gloo CPU processes against the single-process float64 dense oracle.

Each world size is launched once (process start is the expensive part); the children loop over
every case — layouts x masks — and return their measured errors and hop counts, which the tests
below assert. Every rank runs the ring on its shard, all-gathers and unshards ``out``, ``lse`` and
the gradients of ``q``, ``k``, ``v``, and compares them with :func:`dense_attention` under the exact
mask :func:`tile_mask` on the whole sequence (the loss also weights the LSE, so its gradient path
is checked). Masks: causal, bidirectional, windows, block-causal and local blocks straddling shard
boundaries, packed documents straddling them with padding (fully masked rows), GQA.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from mmgrow.layers.attention import FullAttention
from mmgrow.layers.ring import RingAttention
from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.blockwise import blockwise_attention
from mmgrow.ops.ring import RingStats, merge_partials, ring_attention
from mmgrow.ops.ring_plan import PLAN_CACHE_ATTR, ring_hops, visibility_matrix
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.parallel.sharding import shard, shard_context, shard_indices, unshard
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, ContextParallel, MaskSpec, SeqContext
from mmgrow.testing.distributed import DistributedRunError, run_distributed

SEQ_LEN = {2: 24, 3: 24, 4: 32}  # divisible by 2W (zigzag); T_local = 12, 8, 8
Q_BLOCK, K_BLOCK = 3, 4           # tiles smaller than a shard, with ragged last tiles
HEAD_DIM = 4
F64_TOL = 1e-10
F32_REL_TOL = 1e-5


@dataclass(frozen=True)
class Case:
    name: str
    spec: MaskSpec
    heads: tuple[int, int] = (2, 2)  # (H, Hk)
    documents: bool = False           # packed documents crossing shard boundaries, then padding
    blocks: bool = False              # bidirectional blocks of 5 crossing shard boundaries
    aligned_documents: bool = False   # one document per contiguous shard (never crosses)
    dtype: torch.dtype = torch.float64


def _cases(T_local: int) -> list[Case]:
    return [
        Case("causal", MaskSpec()),
        Case("bidirectional GQA", MaskSpec(causal=False), heads=(4, 2)),
        Case("causal window 5 GQA", MaskSpec(window=5), heads=(4, 2)),
        Case(f"causal window {T_local + 2}", MaskSpec(window=T_local + 2)),
        Case("block-causal", MaskSpec(), blocks=True),
        Case("documents + padding + blocks GQA", MaskSpec(), heads=(4, 2), documents=True, blocks=True),
        Case("bidirectional documents + padding, window 4", MaskSpec(causal=False, window=4), documents=True),
        Case("local shared prefix", MaskSpec(local=True, shared_prefix=True), blocks=True),
        Case("bidirectional local shared prefix + documents", MaskSpec(causal=False, local=True, shared_prefix=True),
             documents=True, blocks=True),
        Case("documents aligned to shards", MaskSpec(), aligned_documents=True),
        Case("float32 documents + padding GQA", MaskSpec(), heads=(4, 2), documents=True, dtype=torch.float32),
    ]


def _expected_contiguous_hops(case: Case, world_size: int, T_local: int) -> int | None:
    """The hops a contiguous layout must use, derived from the mask (None: not asserted)."""
    if case.aligned_documents:
        return 0
    if case.documents or case.blocks or case.spec.local:
        return None
    if case.spec.window is not None:  # the first query of a shard reaches back window - 1 positions
        return min(world_size - 1, math.ceil((case.spec.window - 1) / T_local))
    return world_size - 1  # plain causal: the last rank sees the first; bidirectional: everyone sees everyone


# --------------------------------------------------------------------------------------------------
# Whole-sequence inputs, identical on every rank (seeded)
# --------------------------------------------------------------------------------------------------


def _full_context(case: Case, T: int, world_size: int, B: int = 2) -> SeqContext:
    """Per-token facts of the whole sequence ``[B, T]``."""
    positions = torch.arange(T).repeat(B, 1)
    segments = None
    if case.documents:
        segments = torch.full((B, T), PAD_SEGMENT, dtype=torch.long)
        # row 0: documents cut at 30 % and 75 %, padding from 90 %; row 1: cut at 55 %, two pads at the end
        for b, cuts in enumerate(((0, round(0.3 * T), round(0.75 * T), round(0.9 * T)), (0, round(0.55 * T), T - 2))):
            for d, (lo, hi) in enumerate(itertools.pairwise(cuts)):
                segments[b, lo:hi] = d
                positions[b, lo:hi] = torch.arange(hi - lo)
    elif case.aligned_documents:
        T_local = T // world_size
        segments = (torch.arange(T) // T_local).repeat(B, 1)
        positions = (torch.arange(T) % T_local).repeat(B, 1)
    blocks = None
    if case.blocks:
        # a loose prefix (text), then blocks of 5 tokens separated by one loose token (end of frame);
        # row 1 is shifted so its blocks straddle other boundaries
        blocks = torch.full((B, T), NO_BLOCK, dtype=torch.long)
        for b, start in enumerate((3, 1)):
            t = torch.arange(T - start)
            ids = torch.where(t % 6 == 5, torch.full_like(t, NO_BLOCK), t // 6)
            blocks[b, start:] = ids
    return SeqContext(positions=positions, segment_ids=segments, block_ids=blocks, mask=case.spec)


def _full_tensors(case: Case, T: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    H, Hk = case.heads
    B = 2

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(case.dtype)

    return {"q": randn(B, H, T, HEAD_DIM), "k": randn(B, Hk, T, HEAD_DIM), "v": randn(B, Hk, T, HEAD_DIM),
            "g_out": randn(B, H, T, HEAD_DIM), "g_lse": randn(B, H, T)}


def _loss(out: torch.Tensor, lse: torch.Tensor, g_out: torch.Tensor, g_lse: torch.Tensor) -> torch.Tensor:
    """Weights both outputs, so ``dlse`` enters the backward; ``-inf`` LSEs of empty rows contribute 0."""
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * g_out).sum() + (finite * g_lse).sum()


def _oracle(case: Case, full: dict, ctx: SeqContext) -> dict[str, torch.Tensor]:
    q, k, v = (full[n].to(torch.float64).requires_grad_(True) for n in ("q", "k", "v"))
    meta = TokenMeta.from_context(ctx)
    out, lse = dense_attention(q, k, v, tile_mask(meta, meta, case.spec))
    _loss(out, lse, full["g_out"].double(), full["g_lse"].double()).backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _error(got: torch.Tensor, want: torch.Tensor, relative: bool) -> float:
    """Max abs (or relative to ``max |want|``) difference; infinities must sit at the same places."""
    got, want = got.double(), want.double()
    if not torch.equal(torch.isinf(got), torch.isinf(want)) or bool(torch.isnan(got).any()):
        return math.inf
    finite = torch.isfinite(want)
    diff = float((got[finite] - want[finite]).abs().max()) if finite.any() else 0.0
    return diff / max(float(want[finite].abs().max()), 1e-30) if relative else diff


# --------------------------------------------------------------------------------------------------
# What every rank runs
# --------------------------------------------------------------------------------------------------


def _run_case(case: Case, layout: str, rank: int, world_size: int) -> dict:
    T = SEQ_LEN[world_size]
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world_size, layout=layout)
    full_ctx = _full_context(case, T, world_size)
    full = _full_tensors(case, T, seed=zlib.crc32(case.name.encode()))  # same on every rank
    local_ctx = shard_context(full_ctx, cp)
    q, k, v = (shard(full[n], world_size, rank, layout, dim=2).requires_grad_(True) for n in ("q", "k", "v"))
    stats = RingStats()
    out, lse = ring_attention(q, k, v, TokenMeta.from_context(local_ctx), case.spec, cp, q_block=Q_BLOCK,
                              k_block=K_BLOCK, stats=stats)
    assert out.dtype == case.dtype and lse.dtype == case.dtype, (out.dtype, lse.dtype)
    _loss(out, lse, *(shard(full[n], world_size, rank, layout, dim=2) for n in ("g_out", "g_lse"))).backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == case.dtype
    got = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    want = _oracle(case, full, full_ctx)
    relative = case.dtype != torch.float64
    errors = {name: _error(unshard(t.contiguous(), cp, dim=2), want[name], relative) for name, t in got.items()}
    # padding rows see nothing: exactly 0 and -inf on this rank's shard
    pad = local_ctx.segment_ids == PAD_SEGMENT if local_ctx.segment_ids is not None else None
    empty_rows_ok = pad is None or bool((out.detach()[pad.unsqueeze(1).expand_as(lse)] == 0).all()
                                        and torch.isneginf(lse.detach()[pad.unsqueeze(1).expand_as(lse)]).all())
    return {"errors": errors, "stats": stats, "empty_rows_ok": empty_rows_ok,
            "grid": world_size * math.ceil(T // world_size / Q_BLOCK) * math.ceil(T // world_size / K_BLOCK)}


def _run_layer(layout: str, rank: int, world_size: int) -> dict:
    """RingAttention on this rank's shard vs FullAttention on the whole sequence, same weights."""
    T, D = SEQ_LEN[world_size], 16
    case = Case("layer", MaskSpec(), documents=True, blocks=True)
    full_ctx = _full_context(case, T, world_size)
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world_size, layout=layout)
    torch.manual_seed(0)
    ring = RingAttention(dim=D, num_heads=4, num_kv_heads=2, query_block=Q_BLOCK, key_block=K_BLOCK).double()
    dense = FullAttention(dim=D, num_heads=4, num_kv_heads=2).double()
    dense.load_state_dict(ring.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, D, generator=gen, dtype=torch.float64)
    g = torch.randn(2, T, D, generator=gen, dtype=torch.float64)

    x_full = x.clone().requires_grad_(True)
    y_full, _ = dense(x_full, full_ctx)
    (y_full * g).sum().backward()

    x_local = shard(x, world_size, rank, layout).requires_grad_(True)
    local_ctx = shard_context(full_ctx, cp)
    y_local, _ = ring(x_local, local_ctx)
    (y_local * shard(g, world_size, rank, layout)).sum().backward()
    errors = {"y": _error(unshard(y_local.detach(), cp), y_full.detach(), False),
              "dx": _error(unshard(x_local.grad, cp), x_full.grad, False)}
    # a second layer on the same batch context reuses the hop plan (one all-gather per batch)
    plans = dict(local_ctx.__dict__.get(PLAN_CACHE_ATTR, {}))
    with torch.no_grad():
        y_again, _ = ring(x_local, local_ctx)
    cached = local_ctx.__dict__.get(PLAN_CACHE_ATTR, {})
    reused = len(plans) == 1 and cached.keys() == plans.keys() and all(cached[k] is p for k, p in plans.items())
    errors["plan cached once and reused"] = 0.0 if reused else math.inf
    errors["second call"] = _error(y_again, y_local.detach(), False)
    for (name, p_ring), p_dense in zip(ring.named_parameters(), dense.parameters()):
        grad = p_ring.grad.clone()
        dist.all_reduce(grad)  # each rank holds the gradient of its own tokens' terms
        errors[f"d{name}"] = _error(grad, p_dense.grad, False)
    return errors


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    T_local = SEQ_LEN[world_size] // world_size
    cases = {(c.name, layout): _run_case(c, layout, rank, world_size)
             for layout in ("contiguous", "zigzag") for c in _cases(T_local)}
    layer = {layout: _run_layer(layout, rank, world_size) for layout in ("contiguous", "zigzag")} \
        if world_size == 2 else {}
    return {"cases": cases, "layer": layer}


@functools.cache
def _launch(world_size: int) -> list[dict]:
    return run_distributed(_worker, world_size, timeout=240)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_matches_dense_oracle(world_size: int) -> None:
    results = _launch(world_size)
    failures = []
    for rank, result in enumerate(results):
        for (name, layout), r in result["cases"].items():
            tol = F32_REL_TOL if "float32" in name else F64_TOL
            bad = {k: f"{e:.3g}" for k, e in r["errors"].items() if not e <= tol}
            if bad or not r["empty_rows_ok"]:
                failures.append(f"W={world_size} rank {rank} {layout} {name}: errors {bad} (tol {tol}), "
                                f"padding rows exactly 0 / -inf: {r['empty_rows_ok']}")
    assert not failures, "\n".join(failures)
    worst = max(e for r in results[0]["cases"].values() for e in r["errors"].values())
    assert worst > 0, "every error is exactly 0: is the comparison vacuous?"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_sends_only_the_hops_the_mask_needs(world_size: int) -> None:
    results = _launch(world_size)
    T_local = SEQ_LEN[world_size] // world_size
    for case in _cases(T_local):
        for layout in ("contiguous", "zigzag"):
            per_rank = [r["cases"][(case.name, layout)] for r in results]
            hops = {r["stats"].hops_planned for r in per_rank}
            assert len(hops) == 1, f"{case.name} {layout}: ranks disagree on the hop count: {hops}"
            for rank, r in enumerate(per_rank):
                s = r["stats"]
                where = f"W={world_size} {layout} {case.name} rank {rank}: {s}"
                assert s.hops_sent == s.hops_planned == s.backward_hops_sent, where
                assert 1 <= s.hops_computed <= s.hops_planned + 1, where
                assert s.tiles_computed + s.tiles_skipped == r["grid"] and s.tiles_computed > 0, where
            expected = _expected_contiguous_hops(case, world_size, T_local)
            if layout == "contiguous" and expected is not None:
                assert hops == {expected}, f"W={world_size} {case.name}: {hops} hops, the mask needs {expected}"
    # plain causal over contiguous shards: rank r computes hops 0..r only (later shards are in its future)
    causal = [r["cases"][("causal", "contiguous")]["stats"] for r in results]
    assert [s.hops_computed for s in causal] == list(range(1, world_size + 1)), causal
    # a window shorter than a shard: one hop, and far fewer tiles than the causal ring
    window = [r["cases"][("causal window 5 GQA", "contiguous")]["stats"] for r in results]
    assert sum(s.tiles_computed for s in window) < sum(s.tiles_computed for s in causal)


def test_ring_layer_equals_full_attention_on_the_whole_sequence() -> None:
    results = _launch(2)
    for rank, result in enumerate(results):
        for layout, errors in result["layer"].items():
            bad = {k: f"{e:.3g}" for k, e in errors.items() if not e <= F64_TOL}
            assert not bad, f"rank {rank} {layout}: RingAttention differs from FullAttention: {bad}"
            assert {"y", "dx", "dq_proj.weight", "dk_proj.weight", "dv_proj.weight", "dout_proj.weight"} <= set(errors)


# --------------------------------------------------------------------------------------------------
# Single-process parts: the plan, the merge rule, world size 1, the helper
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_plan_never_skips_a_visible_pair(world_size: int, layout: str) -> None:
    T = SEQ_LEN[world_size]
    for case in _cases(T // world_size):
        ctx = _full_context(case, T, world_size)
        full = TokenMeta.from_context(ctx)
        dense = tile_mask(full, full, case.spec)
        idx = [shard_indices(T, world_size, r, layout) for r in range(world_size)]
        metas = [TokenMeta(*(None if t is None else t[:, i] for t in full.tensors())) for i in idx]
        needed = visibility_matrix(metas, case.spec, Q_BLOCK, K_BLOCK)
        for r in range(world_size):
            for s in range(world_size):
                visible = bool(dense[:, idx[r]][:, :, idx[s]].any())
                assert needed[r][s] or not visible, f"{case.name} {layout}: rank {r} sees rank {s} but plan skips it"
        hops = ring_hops(needed)
        assert hops == max(((r - s) % world_size) for r in range(world_size) for s in range(world_size)
                           if needed[r][s])


def test_merge_of_two_key_sets_equals_attention_over_both() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4, dtype=torch.float64), *torch.randn(2, 1, 2, 9, 4, dtype=torch.float64)
    mask = torch.rand(1, 5, 9) < 0.5
    mask[0, 0] = False          # a row that sees nothing at all
    mask[0, 1, :4] = False      # a row that sees nothing in the first key set
    out, lse = dense_attention(q, k, v, mask)
    out_a, lse_a = dense_attention(q, k[:, :, :4], v[:, :, :4], mask[:, :, :4])
    out_b, lse_b = dense_attention(q, k[:, :, 4:], v[:, :, 4:], mask[:, :, 4:])
    merged, merged_lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert _error(merged, out, False) <= 1e-14 and _error(merged_lse, lse, False) <= 1e-14
    assert torch.isneginf(merged_lse[0, :, 0]).all() and (merged[0, :, 0] == 0).all()
    big = torch.full_like(lse_a, 1e4)  # huge LSEs must not overflow
    assert torch.isfinite(merge_partials(out_a, big, out_b, big + 1)[0]).all()


def test_world_size_one_is_blockwise_attention() -> None:
    case = Case("documents + blocks", MaskSpec(), heads=(4, 2), documents=True, blocks=True)
    full = _full_tensors(case, 12, seed=3)
    meta = TokenMeta.from_context(_full_context(case, 12, 1))
    want = blockwise_attention(full["q"], full["k"], full["v"], meta, meta, case.spec, q_block=3, k_block=4)
    for cp in (None, ContextParallel(group=None, rank=0, world_size=1)):
        got = ring_attention(full["q"], full["k"], full["v"], meta, case.spec, cp, q_block=3, k_block=4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()  # rank 0 would wait here forever: the helper must not
    return rank


def test_run_distributed_reports_a_child_failure_with_its_traceback() -> None:
    with pytest.raises(DistributedRunError, match=r"(?s)rank 1 of 2.*ValueError: rank one is unhappy"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)
