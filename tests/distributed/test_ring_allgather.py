"""The all-gather K/V transport of context-parallel attention on 2, 3 and 4 gloo CPU processes.

Each world size is launched once; the children loop over layouts x masks, run
:func:`~mmgrow.ops.ring_allgather.allgather_attention` on their shard, unshard ``out``, ``lse`` and the
gradients of ``q``, ``k``, ``v`` and compare them with the single-process float64 dense oracle on the
whole sequence (the helpers and cases of ``test_ring.py``: causal, bidirectional, windows, blocks and
packed documents straddling shard boundaries, padding rows, GQA). They also count the collectives
(:class:`~mmgrow.ops.ring.RingStats`) and, with ``W = 2``, train step a tiny
:class:`~mmgrow.models.unified.UnifiedModel` with ``transport="allgather"`` against ``"ring"`` and one
process. The transport rule of :func:`~mmgrow.ops.ring_plan.choose_transport` is tested in one process.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
import torch.distributed as dist
from test_ring import (  # the sibling test module (pytest puts tests/distributed on sys.path): same cases
    F32_REL_TOL,
    F64_TOL,
    K_BLOCK,
    Q_BLOCK,
    SEQ_LEN,
    Case,
    _error,
    _full_context,
    _full_tensors,
    _loss,
    _oracle,
)

from mmgrow.ops.ring import RingStats
from mmgrow.ops.ring_allgather import allgather_attention
from mmgrow.ops.ring_plan import RingPlan, choose_transport, ring_hops, transport_cost, visibility_matrix
from mmgrow.ops.token_meta import TokenMeta
from mmgrow.parallel.sharding import shard, shard_context, shard_indices, unshard
from mmgrow.protocols import PAD_SEGMENT, ContextParallel, MaskSpec
from mmgrow.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _cases(T_local: int) -> list[Case]:
    return [
        Case("causal", MaskSpec()),
        Case("bidirectional GQA 4:1", MaskSpec(causal=False), heads=(4, 1)),
        Case("causal window 5 GQA", MaskSpec(window=5), heads=(4, 2)),
        Case("documents + padding + blocks GQA", MaskSpec(), heads=(4, 2), documents=True, blocks=True),
        Case("bidirectional documents + padding, window 4", MaskSpec(causal=False, window=4), documents=True),
        Case("documents aligned to shards", MaskSpec(), aligned_documents=True),
        Case("float32 documents + padding GQA", MaskSpec(), heads=(4, 2), documents=True, dtype=torch.float32),
    ]


def _run_case(case: Case, layout: str, rank: int, world_size: int, fused) -> dict:
    T = SEQ_LEN[world_size]
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world_size, layout=layout)
    full_ctx = _full_context(case, T, world_size)
    full = _full_tensors(case, T, seed=zlib.crc32(case.name.encode()))
    local_ctx = shard_context(full_ctx, cp)
    q, k, v = (shard(full[n], world_size, rank, layout, dim=2).requires_grad_(True) for n in ("q", "k", "v"))
    stats = RingStats()
    meta = TokenMeta.from_context(local_ctx)
    out, lse = allgather_attention(q, k, v, meta, case.spec, cp, q_block=Q_BLOCK, k_block=K_BLOCK, stats=stats,
                                   fused=fused)
    assert out.dtype == case.dtype and lse.dtype == case.dtype, (out.dtype, lse.dtype)
    _loss(out, lse, *(shard(full[n], world_size, rank, layout, dim=2) for n in ("g_out", "g_lse"))).backward()
    got = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    want = _oracle(case, full, full_ctx)
    relative = case.dtype != torch.float64
    errors = {name: _error(unshard(t.contiguous(), cp, dim=2), want[name], relative) for name, t in got.items()}
    pad = local_ctx.segment_ids == PAD_SEGMENT if local_ctx.segment_ids is not None else None
    empty_rows_ok = pad is None or bool((out.detach()[pad.unsqueeze(1).expand_as(lse)] == 0).all()
                                        and torch.isneginf(lse.detach()[pad.unsqueeze(1).expand_as(lse)]).all())
    plan = RingPlan.build(meta, case.spec, cp, Q_BLOCK, K_BLOCK)
    return {"errors": errors, "stats": stats, "empty_rows_ok": empty_rows_ok, "needed": plan.needed[rank]}


def _make_model(transport: str):
    from mmgrow.models.factories import factory_from_spec
    from mmgrow.models.unified import UnifiedModel

    torch.manual_seed(0)
    mixer = factory_from_spec({"class_path": "ring", "init_args": {
        "num_heads": 4, "num_kv_heads": 1, "query_block": 4, "key_block": 4, "transport": transport}})
    return UnifiedModel(token_space={"text": 13, "video": 9}, dim=16, depth=2, mixer=mixer).double()


def _run_model(layout: str, rank: int, world_size: int) -> dict:
    """Loss and gradients of one step: ring vs allgather transport on the shards, and one process."""
    from test_mesh_parallel import make_batch

    from mmgrow.objectives.autoregressive import AutoregressiveObjective
    from mmgrow.parallel.context_batch import context_parallel_loss

    objective = AutoregressiveObjective()
    batch = make_batch(7)
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world_size, layout=layout)
    results = {}
    for transport in ("ring", "allgather"):
        model = _make_model(transport)
        objective.bind(model.token_space)
        loss = context_parallel_loss(model, objective, batch, cp)[0]
        loss.backward()
        results[transport] = (float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()})
    reference = _make_model("ring")
    ref_loss = float(objective.step(reference, batch)[0].detach())
    (ring_loss, ring_grads), (ag_loss, ag_grads) = results["ring"], results["allgather"]
    return {"loss vs one process": abs(ag_loss - ref_loss), "loss vs ring": abs(ag_loss - ring_loss),
            "grads vs ring": max(float((ag_grads[n] - g).abs().max()) for n, g in ring_grads.items()),
            "grad scale": max(float(g.abs().max()) for g in ring_grads.values())}


def _run_auto_layer(rank: int, world_size: int) -> dict:
    """RingAttention(transport="auto") with GQA 4:1 on the shards: the transport it picks per mask, and its
    output against the same layer forced to each transport."""
    from mmgrow.layers.ring import RingAttention

    T, D = SEQ_LEN[world_size], 16
    # contiguous: a window then needs one hop (under zigzag its late chunks reach W - 1 ranks back)
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world_size, layout="contiguous")
    x = shard(torch.randn(2, T, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64), world_size,
              rank, "contiguous")
    found = {}
    for name, spec in (("causal", MaskSpec()), ("window 3", MaskSpec(window=3))):
        ctx = shard_context(_full_context(Case(name, spec), T, world_size), cp)
        outputs = {}
        for transport in ("auto", "ring", "allgather"):
            torch.manual_seed(0)
            layer = RingAttention(dim=D, num_heads=4, num_kv_heads=1, query_block=Q_BLOCK, key_block=K_BLOCK,
                                  transport=transport).double()
            with torch.no_grad():
                outputs[transport] = layer(x, ctx)[0]
            if transport == "auto":
                meta = TokenMeta.from_context(ctx)
                q = torch.empty(2, 4, T // world_size, 1)
                found[name] = layer.transport_for(q, q[:, :1], ctx, meta)
        found[f"{name} error"] = max(_error(outputs["auto"], outputs[t], False) for t in ("ring", "allgather"))
    return found


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    T_local = SEQ_LEN[world_size] // world_size
    cases = {(c.name, layout, str(fused)): _run_case(c, layout, rank, world_size, fused)
             for layout in ("contiguous", "zigzag") for c in _cases(T_local) for fused in ("auto", False)}
    model = {layout: _run_model(layout, rank, world_size) for layout in ("contiguous", "zigzag")} \
        if world_size == 2 else {}
    return {"cases": cases, "model": model, "auto": _run_auto_layer(rank, world_size)}


@functools.cache
@functools.cache
def _launch(world_size: int) -> list[dict]:
    """One multi-process run per world size, shared by the tests that read it (each launch costs seconds)."""
    return run_distributed(_worker, world_size, timeout=240)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_allgather_matches_dense_oracle(world_size: int) -> None:
    """out, lse, dq, dk, dv of every rank equal the float64 oracle (1e-10; float32 cases 1e-5 relative),
    with the fused per-hop kernel ("auto") and the tile kernels (False); padding rows exactly 0 / -inf."""
    results = _launch(world_size)
    failures = []
    for rank, result in enumerate(results):
        for (name, layout, fused), r in result["cases"].items():
            tol = F32_REL_TOL if "float32" in name else F64_TOL
            bad = {k: f"{e:.3g}" for k, e in r["errors"].items() if not e <= tol}
            if bad or not r["empty_rows_ok"]:
                failures.append(f"W={world_size} rank {rank} {layout} fused={fused} {name}: errors {bad} "
                                f"(tol {tol}), padding rows exactly 0 / -inf: {r['empty_rows_ok']}")
    assert not failures, "\n".join(failures)
    worst = max(e for r in results[0]["cases"].values() for e in r["errors"].values())
    assert worst > 0, "every error is exactly 0: is the comparison vacuous?"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_allgather_collectives_and_skipped_sources(world_size: int) -> None:
    """One all-gather forward, all-gather + reduce-scatter backward -- none when no rank needs another's
    keys -- and only the sources the plan marks as needed are computed."""
    results = _launch(world_size)
    for rank, result in enumerate(results):
        for (name, layout, fused), r in result["cases"].items():
            s, where = r["stats"], f"W={world_size} rank {rank} {layout} {name}: {r['stats']}"
            communicate = int(s.hops_planned > 0)
            assert (s.hops_sent, s.backward_hops_sent) == (communicate, 2 * communicate), where
            assert s.hops_computed == sum(r["needed"]), where
            if fused == "False":
                assert s.fused_calls == 0, where
    aligned = [r["cases"][("documents aligned to shards", "contiguous", "auto")]["stats"] for r in results]
    assert all(s.hops_planned == 0 and s.hops_sent == 0 and s.hops_computed == 1 for s in aligned), aligned
    # contiguous causal: rank r needs sources 0..r only (the later ones are its future)
    causal = [r["cases"][("causal", "contiguous", "auto")]["stats"] for r in results]
    assert [s.hops_computed for s in causal] == list(range(1, world_size + 1)), causal
    assert sum(s.fused_calls for s in causal) > 0, "the fused per-hop kernel never ran"


def test_allgather_layer_in_a_model_equals_ring_and_one_process() -> None:
    """A tiny UnifiedModel (GQA 4:1 ring mixers) with transport="allgather": loss equal to the ring
    transport's and to one process, every parameter gradient equal to the ring's (1e-10)."""
    results = _launch(2)
    for rank, result in enumerate(results):
        for layout, d in result["model"].items():
            assert d["loss vs one process"] <= F64_TOL and d["loss vs ring"] <= F64_TOL, (rank, layout, d)
            assert d["grads vs ring"] <= F64_TOL * max(1.0, d["grad scale"]), (rank, layout, d)
            assert d["grad scale"] > 0, (rank, layout, d)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_auto_transport_in_the_layer(world_size: int) -> None:
    """GQA 4:1 (g = 4), contiguous shards: causal attention (every hop needed) picks the all-gather for
    W = 3, 4 and the ring for W = 2; a window of 3 (one hop) picks the ring; the same on every rank, and equal to both forced
    transports (1e-12)."""
    results = _launch(world_size)
    want = "allgather" if world_size >= 3 else "ring"
    for rank, r in enumerate(results):
        got = r["auto"]
        assert (got["causal"], got["window 3"]) == (want, "ring"), (world_size, rank, got)
        assert got["causal error"] <= 1e-12 and got["window 3 error"] <= 1e-12, (world_size, rank, got)


# --------------------------------------------------------------------------------------------------
# One process: the transport rule
# --------------------------------------------------------------------------------------------------


def _plans(case: Case, world_size: int, layout: str) -> list[RingPlan]:
    T = SEQ_LEN[world_size]
    full = TokenMeta.from_context(_full_context(case, T, world_size))
    idx = [shard_indices(T, world_size, r, layout) for r in range(world_size)]
    metas = [TokenMeta(*(None if t is None else t[:, i] for t in full.tensors())) for i in idx]
    needed = visibility_matrix(metas, case.spec, Q_BLOCK, K_BLOCK)
    return [RingPlan(r, world_size, metas, needed, ring_hops(needed)) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_choose_transport_follows_the_rule(world_size: int) -> None:
    """allgather iff every hop is needed (n_hops = W - 1), W >= 3 and H / Hk >= W; the same on every rank."""
    T_local = SEQ_LEN[world_size] // world_size
    seen = set()
    for case in _cases(T_local):
        for layout in ("contiguous", "zigzag"):
            plans = _plans(case, world_size, layout)
            for H, Hk in ((4, 4), (4, 2), (4, 1), (8, 2), (8, 1)):
                choices = {choose_transport(p, H, Hk, T_local, world_size) for p in plans}
                assert len(choices) == 1, f"{case.name} {layout}: ranks disagree: {choices}"
                n = plans[0].n_hops
                want = "allgather" if n == world_size - 1 and world_size >= 3 and H // Hk >= world_size else "ring"
                assert choices == {want}, f"W={world_size} {case.name} {layout} H={H} Hk={Hk} n_hops={n}"
                seen.add(want)
    assert seen == ({"ring", "allgather"} if world_size >= 3 else {"ring"})
    # the numbers behind it: at n_hops = W - 1 the bytes are equal and the all-gather takes fewer steps
    plan = _plans(Case("causal", MaskSpec()), world_size, "zigzag")[0]
    cost = transport_cost(plan, kv_heads=1, local_len=T_local)
    assert cost["ring"].sent_forward == cost["allgather"].sent_forward == (world_size - 1) * 2 * T_local
    assert cost["allgather"].kv_held == world_size * 2 * T_local and cost["ring"].kv_held == 4 * T_local
    assert cost["allgather"].collectives == 3 and cost["ring"].collectives == 2 * (world_size - 1) + 1


def test_choose_transport_rejects_bad_heads() -> None:
    plan = _plans(Case("causal", MaskSpec()), 3, "zigzag")[0]
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        choose_transport(plan, 4, 3, 8, 3)
    with pytest.raises(ValueError, match="differs from the plan"):
        choose_transport(plan, 4, 1, 8, 4)


def test_layer_validates_transport_options() -> None:
    from mmgrow.layers.ring import RingAttention

    with pytest.raises(ValueError, match="transport must be one of"):
        RingAttention(dim=8, num_heads=2, transport="p2p")
    with pytest.raises(ValueError, match="lean=True is a mode of the ring"):
        RingAttention(dim=8, num_heads=2, transport="allgather", lean=True)
    with pytest.raises(ValueError, match="fused must be"):
        RingAttention(dim=8, num_heads=2, fused="yes")
    layer = RingAttention(dim=8, num_heads=2, transport="allgather", fused=False)
    assert (layer.transport, layer.lean, layer.fused) == ("allgather", False, False)


@pytest.mark.parametrize("fused", ["auto", False])
def test_unsharded_layer_equals_full_attention(fused) -> None:
    """Without ctx.cp the layer runs ring_attention's local hop (fused where the mask allows) and equals
    FullAttention on the same weights in float64, outputs and input gradients."""
    from mmgrow.layers.attention import FullAttention
    from mmgrow.layers.ring import RingAttention

    case = Case("documents + blocks", MaskSpec(), heads=(4, 2), documents=True, blocks=True)
    ctx = _full_context(case, 12, 1)
    for spec_ctx in (ctx, _full_context(Case("causal", MaskSpec()), 12, 1)):
        torch.manual_seed(0)
        ring = RingAttention(dim=16, num_heads=4, num_kv_heads=2, query_block=3, key_block=4, fused=fused).double()
        dense = FullAttention(dim=16, num_heads=4, num_kv_heads=2).double()
        dense.load_state_dict(ring.state_dict())
        x = torch.randn(2, 12, 16, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ring(xa, spec_ctx)[0], dense(xb, spec_ctx)[0]
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert _error(ya.detach(), yb.detach(), False) <= 1e-12
        assert _error(xa.grad, xb.grad, False) <= 1e-12
