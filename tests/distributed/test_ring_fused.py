"""The fused per-hop kernel of the ring (:mod:`mmgrow.ops.ring_hop`) and the lean ring mode, in float64.

Single process: :func:`hop_forward` / :func:`hop_backward` equal the tile kernels they replace on the
hops a zigzag or contiguous ring produces (causal, bidirectional, GQA, and masks that must fall back:
window, packed documents, bidirectional blocks), and the fused backward given the *final* ``out`` and
``lse`` of a two-hop split sums to the gradient of attention over all keys. On 2, 3 and 4 gloo
processes: the ring with the fused hops, overlapped and lean, equals the dense float64 oracle to
1e-12 (outputs, LSE, dq, dk, dv), and the fused kernel really ran where the mask allows it.
Only the CPU kernels run here; the CUDA branch of ``ring_hop`` is not exercised (no GPU in CI).
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from mmgrow.ops import ring as ring_module
from mmgrow.ops import ring_hop
from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.blockwise import TilePlan, backward_tiles, forward_tiles
from mmgrow.ops.ring import RingStats, merge_partials, ring_attention
from mmgrow.ops.ring_hop import fused_pieces, hop_backward, hop_forward, hop_pieces
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.parallel.sharding import shard, shard_indices, unshard
from mmgrow.protocols import NO_BLOCK, ContextParallel, MaskSpec
from mmgrow.testing.distributed import run_distributed

TOL = 1e-12
HEAD_DIM = 4


def _meta(index: list[int], B: int = 2, segments: bool = False, blocks: bool = False) -> TokenMeta:
    idx = torch.tensor(index).expand(B, -1)
    seg = (idx // 7) if segments else None            # documents of 7 tokens, crossing chunk edges
    blk = torch.where(idx % 5 < 3, idx // 5, torch.full_like(idx, NO_BLOCK)) if blocks else None
    return TokenMeta(idx, idx, seg, blk)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


HOP_CASES = [  # (name, spec, H, Hk, segments, blocks, fused expected on the diagonal hop)
    ("causal", MaskSpec(), 2, 2, False, False, True),
    ("bidirectional GQA", MaskSpec(causal=False), 4, 2, False, False, True),
    ("causal GQA", MaskSpec(), 6, 2, False, False, True),
    ("window 5", MaskSpec(window=5), 2, 2, False, False, False),
    ("documents", MaskSpec(), 2, 2, True, False, False),
    ("block-causal", MaskSpec(), 2, 2, False, True, False),
]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("max_piece", [None, 3])
@pytest.mark.parametrize("case", HOP_CASES, ids=[c[0] for c in HOP_CASES])
def test_hop_equals_the_tile_kernels(case, max_piece, layout) -> None:
    """Every (rank, source) hop of a 3-rank ring: same out, lse and gradients as the tile kernels (with an
    arbitrary delta, i.e. a d lse term), whether the hop runs fused pieces, tiles, or both."""
    name, spec, H, Hk, segments, blocks, fused_diag = case
    W, T = 3, 24
    fused_seen = 0
    for r, s in itertools.product(range(W), range(W)):
        qm = _meta(shard_indices(T, W, r, layout).tolist(), segments=segments, blocks=blocks)
        km = _meta(shard_indices(T, W, s, layout).tolist(), segments=segments, blocks=blocks)
        plan = TilePlan(qm, km, spec, 3, 4)
        if plan.tiles_needed == 0:
            continue
        seed = 7 * r + s
        q, k, v = _rand(2, H, 8, HEAD_DIM, seed=seed), _rand(2, Hk, 8, HEAD_DIM, seed=seed + 1), \
            _rand(2, Hk, 8, HEAD_DIM, seed=seed + 2)
        want_o, want_l = forward_tiles(q, k, v, plan, 0.7)
        got_o, got_l = hop_forward(q, k, v, plan, 0.7, max_piece=max_piece)
        assert torch.equal(torch.isinf(got_l), torch.isinf(want_l))
        fin = torch.isfinite(want_l)
        assert _maxdiff(got_o, want_o) < TOL and _maxdiff(got_l[fin], want_l[fin]) < TOL
        dout = _rand(2, H, 8, HEAD_DIM, seed=seed + 3)
        lse = torch.where(fin, want_l + 0.25, torch.full_like(want_l, math.inf))  # "final" lse: other hops add mass
        delta = _rand(2, H, 8, seed=seed + 4)
        want = backward_tiles(q, k, v, dout, lse, delta, plan, 0.7)
        got = hop_backward(q, k, v, dout, lse, delta, plan, 0.7, max_piece=max_piece)
        for g, w in zip(got, want, strict=True):
            assert float((g - w).abs().max()) < TOL, name
        pieces = fused_pieces(q, plan, "auto", max_piece) or []
        fused_seen += sum(p.kind != "tiles" for p in pieces)
        assert fused_pieces(q, plan, False, max_piece) is None
    if fused_diag:
        assert fused_seen > 0, f"{name}: the fused kernel never ran"


def test_fused_backward_with_the_final_out_and_lse_is_the_whole_gradient() -> None:
    """Keys split into two hops: each hop's fused backward, given the merged out and lse, sums to autograd
    of softmax attention over all keys (the identity the ring's backward relies on)."""
    H, T, S = 2, 8, 6
    q, k, v = (_rand(1, H, n, HEAD_DIM, seed=i).requires_grad_() for i, n in enumerate((T, 2 * S, 2 * S)))
    out = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v
    dout = _rand(1, H, T, HEAD_DIM, seed=9)
    out.backward(dout)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    parts = []
    for a, b in ((0, S), (S, 2 * S)):
        plan = TilePlan(_meta(list(range(100, 100 + T)), B=1), _meta(list(range(a, b)), B=1), MaskSpec(), 4, 4)
        assert [p.kind for p in hop_pieces(plan)] == ["full"]
        parts.append((plan, hop_forward(qd, kd[:, :, a:b], vd[:, :, a:b], plan, 0.5, fused=True)))
    o, lse = merge_partials(*parts[0][1], *parts[1][1])
    assert float((o - out.detach()).abs().max()) < TOL
    delta = (dout * o).sum(-1)
    dq = torch.zeros_like(qd)
    dks, dvs = [], []
    for (plan, _), (a, b) in zip(parts, ((0, S), (S, 2 * S)), strict=True):
        _, dk, dv = hop_backward(qd, kd[:, :, a:b], vd[:, :, a:b], dout, lse, delta, plan, 0.5, dq_into=dq, out=o,
                                 fused=True)
        dks.append(dk)
        dvs.append(dv)
    assert float((dq - q.grad).abs().max()) < TOL
    assert float((torch.cat(dks, 2) - k.grad).abs().max()) < TOL
    assert float((torch.cat(dvs, 2) - v.grad).abs().max()) < TOL


def test_pieces_of_zigzag_hops_and_the_fused_knob() -> None:
    """Zigzag, 2 ranks of chunks (0, 3) and (1, 2): rank 0's own hop is two causal diagonals plus chunk 3
    over chunk 0 in full; rank 0 over rank 1 is chunk 3 over the run 1-2 in full. ``fused`` is checked."""
    c = 4
    r0 = _meta([*range(c), *range(3 * c, 4 * c)])
    r1 = _meta([*range(c, 3 * c)])
    own = TilePlan(r0, r0, MaskSpec(), 2, 2)
    assert sorted((p.qs.start, p.ks.start, p.kind) for p in hop_pieces(own)) == \
        [(0, 0, "causal"), (c, 0, "full"), (c, c, "causal")]
    other = TilePlan(r0, r1, MaskSpec(), 2, 2)
    assert [(p.qs.start, p.qs.stop, p.ks.start, p.ks.stop, p.kind) for p in hop_pieces(other)] == \
        [(c, 2 * c, 0, 2 * c, "full")]
    q = torch.zeros(2, 2, 2 * c, HEAD_DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="fused must be"):
        hop_forward(q, q, q, own, 1.0, fused="yes")
    with pytest.raises(ValueError, match="no fused kernel"):
        hop_forward(q.to(torch.int32), q, q, own, 1.0, fused=True)  # no kernel for an int dtype
    calls = []
    original = ring_hop._fused_forward
    try:
        ring_hop._fused_forward = lambda *a: calls.append(1) or original(*a)
        hop_forward(q, q, q, own, 1.0, fused=False)
        assert not calls
        hop_forward(q, q, q, own, 1.0)
        assert len(calls) == 3
    finally:
        ring_hop._fused_forward = original


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("case", HOP_CASES, ids=[c[0] for c in HOP_CASES])
def test_one_process_ring_matches_the_float64_oracle(case, with_lse) -> None:
    """W = 1 (no group): the single local hop, fused where the mask allows, equals dense attention in
    out, lse and gradients, with and without a gradient through the LSE (the ``out'`` path)."""
    name, spec, H, Hk, segments, blocks, fused_diag = case
    T = 24
    meta = _meta(list(range(T)), segments=segments, blocks=blocks)
    q, k, v = (_rand(2, h, T, HEAD_DIM, seed=i).requires_grad_() for i, h in enumerate((H, Hk, Hk)))
    g, g_lse = _rand(2, H, T, HEAD_DIM, seed=5), _rand(2, H, T, seed=6)
    stats = RingStats()
    out, lse = ring_attention(q, k, v, meta, spec, None, q_block=3, k_block=4, stats=stats)
    got = [out, lse]
    loss = (out * g).sum() + ((torch.where(torch.isfinite(lse), lse, 0.0) * g_lse).sum() if with_lse else 0.0)
    got += list(torch.autograd.grad(loss, (q, k, v)))
    w_out, w_lse = dense_attention(q, k, v, tile_mask(meta, meta, spec))
    w_loss = (w_out * g).sum() + ((torch.where(torch.isfinite(w_lse), w_lse, 0.0) * g_lse).sum() if with_lse else 0.0)
    want = [w_out, w_lse, *torch.autograd.grad(w_loss, (q, k, v))]
    for a, b in zip(got, want, strict=True):
        fin = torch.isfinite(b)
        assert torch.equal(torch.isinf(a), torch.isinf(b)) and _maxdiff(a[fin], b[fin]) < TOL, name
    assert (stats.fused_calls > 0) == fused_diag, (name, stats.fused_calls)


# --------------------------------------------------------------------------------------------------
# The ring on 2, 3, 4 processes
# --------------------------------------------------------------------------------------------------

RING_CASES = [  # (name, spec, H, Hk, segments, fused must run)
    ("causal", MaskSpec(), 2, 2, False, True),
    ("bidirectional", MaskSpec(causal=False), 2, 2, False, True),
    ("causal GQA", MaskSpec(), 4, 2, False, True),
    ("window 6 + documents (fallback)", MaskSpec(window=6), 2, 2, True, False),
]
SEQ = {2: 32, 3: 48, 4: 64}


def _ring_case(rank: int, world_size: int, case, layout: str, lean: bool) -> dict:
    _, spec, H, Hk, segments, _ = case
    T = SEQ[world_size]
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world_size, layout=layout)
    full_meta = _meta(list(range(T)), segments=segments)
    full = {n: _rand(2, h, T, HEAD_DIM, seed=i) for i, (n, h) in enumerate((("q", H), ("k", Hk), ("v", Hk),
                                                                          ("g", H)))}
    g_lse = _rand(2, H, T, seed=11)
    index = shard_indices(T, world_size, rank, layout)
    meta = TokenMeta(*(None if t is None else t[:, index] for t in full_meta.tensors()))
    q, k, v = (shard(full[n], world_size, rank, layout, dim=2).requires_grad_() for n in ("q", "k", "v"))
    stats = RingStats()
    out, lse = ring_attention(q, k, v, meta, spec, cp, q_block=3, k_block=4, stats=stats, lean=lean)
    fin = torch.isfinite(lse)
    loss = (out * shard(full["g"], world_size, rank, layout, dim=2)).sum() + \
        (torch.where(fin, lse, 0.0) * shard(g_lse, world_size, rank, layout, dim=2)).sum()
    loss.backward()
    qf, kf, vf = (full[n].clone().requires_grad_() for n in ("q", "k", "v"))
    w_out, w_lse = dense_attention(qf, kf, vf, tile_mask(full_meta, full_meta, spec))
    ((w_out * full["g"]).sum() + (torch.where(torch.isfinite(w_lse), w_lse, 0.0) * g_lse).sum()).backward()
    got = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    want = {"out": w_out, "lse": w_lse, "dq": qf.grad, "dk": kf.grad, "dv": vf.grad}
    errors = {}
    for key, t in got.items():
        g, w = unshard(t.detach().contiguous(), cp, dim=2), want[key].detach()
        same_inf = torch.equal(torch.isinf(g), torch.isinf(w))
        errors[key] = _maxdiff(g[torch.isfinite(w)], w[torch.isfinite(w)]) if same_inf else math.inf
    return {"errors": errors, "fused_calls": stats.fused_calls}


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still alive (what the ring allocates)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, storage.data_ptr())
        return out


def _ring_peak_bytes(rank: int, world_size: int, lean: bool) -> int:
    """Peak live bytes the ring allocates in one forward + backward (causal, zigzag, float64, T_local = 64)."""
    T, H = 128, 2
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world_size, layout="zigzag")
    index = shard_indices(T, world_size, rank, "zigzag")
    meta = _meta(index.tolist(), B=1)
    q, k, v = (_rand(1, H, T // world_size, 16, seed=i).requires_grad_() for i in range(3))
    g = _rand(1, H, T // world_size, 16, seed=5)
    ring_attention(q, k, v, meta, MaskSpec(), cp, q_block=8, k_block=8, lean=lean)[0].backward(g)  # warm up
    q.grad = k.grad = v.grad = None
    mode = _LiveBytes()
    for t in (q, k, v, g):  # the inputs are not the ring's allocations
        mode.live[t.untyped_storage().data_ptr()] = 0
    with mode:
        out, _ = ring_attention(q, k, v, meta, MaskSpec(), cp, q_block=8, k_block=8, lean=lean)
        out.backward(g)
        del out
    return mode.peak


def _ring_worker(rank: int, world_size: int) -> list:
    ring_module.LEAN_CHUNK = 5  # chunks smaller than a zigzag half, ragged, crossing its run boundary
    rows = []
    for case, layout, lean in itertools.product(RING_CASES, ("zigzag", "contiguous"), (False, True)):
        rows.append((case[0], layout, lean, _ring_case(rank, world_size, case, layout, lean)))
    if world_size == 2:
        ring_module.LEAN_CHUNK = 4
        rows.append(("peak bytes", None, None, {"overlapped": _ring_peak_bytes(rank, world_size, False),
                                                 "lean": _ring_peak_bytes(rank, world_size, True)}))
    return rows


@functools.cache
def _launch(world_size: int) -> list:
    return run_distributed(_ring_worker, world_size, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fused_ring_matches_the_float64_oracle(world_size: int) -> None:
    """Overlapped and lean ring, both layouts, fused where the mask allows and tiles where not: out, lse,
    dq, dk, dv within 1e-12 of dense float64 attention over the whole sequence, on every rank."""
    fused_by_case: dict[str, int] = {}
    for rank_rows in _launch(world_size):
        for name, layout, lean, row in rank_rows:
            if name == "peak bytes":
                continue
            bad = {k: e for k, e in row["errors"].items() if not e < TOL}
            assert not bad, f"W={world_size} {name} {layout} lean={lean}: {bad}"
            fused_by_case[name] = fused_by_case.get(name, 0) + row["fused_calls"]
    for name, _, _, _, _, must_fuse in RING_CASES:
        if must_fuse:
            assert fused_by_case[name] > 0, f"{name}: the fused kernel never ran in the ring"


@pytest.mark.slow
def test_lean_ring_allocates_chunks_not_shards() -> None:
    """Tensor bytes the ring allocates (2 ranks, T_local = 64, 4-token chunks), in shard-sized units: the
    lean mode stays within its outputs (out, dq, dk, dv: 4) plus two units of chunk buffers and plan facts
    (measured 5.3); the overlapped mode holds at least four more (in-flight K/V, this hop's, travelling
    and arriving dK/dV; measured 12.3-12.8)."""
    shard_bytes = 1 * 2 * 64 * 16 * 8  # [B, H, T_local, hd] float64
    for rank_rows in _launch(2):
        peaks = next(row for name, _, _, row in rank_rows if name == "peak bytes")
        assert peaks["lean"] <= 6 * shard_bytes, peaks
        assert peaks["overlapped"] >= peaks["lean"] + 4 * shard_bytes, peaks
