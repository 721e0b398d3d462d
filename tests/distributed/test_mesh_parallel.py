"""FSDP2, tensor parallelism and context parallelism composed on one ``(dp, cp, tp)`` mesh equal one process.

Every layout runs a small float64 :class:`~mmgrow.models.unified.UnifiedModel` (ring attention with
grouped-query heads, SwiGLU MLPs, two modalities, packed rows with padding) parallelised by
:func:`mmgrow.parallel.parallelize.parallelize` exactly as ``MeshParallelStrategy`` does, on 2 or 4 gloo
processes. Data-parallel rank ``d`` trains on its own batch ``d``; the reference is one process, no
sharding, whose loss is the mean of the ``dp`` batch losses (what averaging gradients over ``dp x cp``
ranks computes). Checked to 1e-10: each rank's loss against the reference loss of its batch, the final
hidden states (gathered over ``cp``) against the reference forward, and every parameter's gradient
(gathered from its DTensor shards) against the reference gradient. One optimizer step later the
losses must still agree, so the sharded optimizer state is right too.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from mmgrow.batch import TokenBatch
from mmgrow.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

SIZES = {"text": 13, "video": 9}
TOL = 1e-10
LENGTH = 16


def make_batch(seed: int) -> TokenBatch:
    """Two rows: row 0 two packed examples then 2 padding tokens, row 1 one example then 3 padding tokens."""
    from mmgrow.tokenspace import TokenSpace

    space = TokenSpace.from_dict(SIZES)
    g = torch.Generator().manual_seed(seed)
    seg = torch.full((2, LENGTH), -1)
    seg[0, :6], seg[0, 6:LENGTH - 2], seg[1, :LENGTH - 3] = 0, 1, 0
    mods = (torch.rand(2, LENGTH, generator=g) < 0.5).long()
    local = torch.where(mods == 0, torch.randint(0, SIZES["text"], seg.shape, generator=g),
                        torch.randint(0, SIZES["video"], seg.shape, generator=g))
    ids = torch.where(seg < 0, 0, local + mods * space.offset("video"))
    mods = torch.where(seg < 0, 0, mods)
    positions = torch.zeros_like(seg)
    for b in range(2):
        for t in range(1, LENGTH):
            positions[b, t] = positions[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    positions = torch.where(seg < 0, 0, positions)
    loss_mask = ((torch.rand(2, LENGTH, generator=g) < 0.85) & (seg >= 0)).float()
    loss_mask[:, 0] = 0
    return TokenBatch(input_ids=ids, modality_ids=mods, positions=positions, segment_ids=seg,
                      block_ids=torch.full_like(seg, -1), loss_mask=loss_mask, example_weight=(seg >= 0).float())


def make_model():
    from mmgrow.models.factories import factory_from_spec
    from mmgrow.models.unified import UnifiedModel

    torch.manual_seed(0)
    mixer = factory_from_spec({"class_path": "ring", "init_args": {"num_heads": 4, "num_kv_heads": 2,
                                                                   "query_block": 4, "key_block": 4}})
    return UnifiedModel(token_space=SIZES, dim=32, depth=2, mixer=mixer).double()


def _loss(model, objective, batch, cp):
    from mmgrow.parallel.context_batch import context_parallel_loss

    if cp is None:
        return objective.step(model, batch)[0]
    return context_parallel_loss(model, objective, batch, cp)[0]


def _hidden(model, objective, batch, cp):
    """Final hidden states of the whole (padded) batch, gathered over the cp group."""
    from mmgrow.parallel.context_batch import pad_to_multiple
    from mmgrow.parallel.sharding import shard, shard_context, shard_multiple, unshard

    if cp is None:
        return model(batch.input_ids, objective.context(batch)).hidden
    padded = pad_to_multiple(batch, shard_multiple(cp.world_size, cp.layout))
    ids = shard(padded.input_ids, cp.world_size, cp.rank, cp.layout, dim=1)
    out = model(ids, shard_context(objective.context(padded), cp)).hidden
    return unshard(out.contiguous(), cp, dim=1)[:, : batch.input_ids.shape[1]]


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _layout_worker(rank: int, world_size: int, dp: int, cp: int, tp: int, layout: str) -> dict:
    from mmgrow.objectives.autoregressive import AutoregressiveObjective
    from mmgrow.parallel.mesh import ParallelDims, build_device_mesh
    from mmgrow.parallel.parallelize import ParallelPlan, parallelize
    from mmgrow.protocols import ContextParallel

    objective = AutoregressiveObjective()
    batches = [make_batch(100 + d) for d in range(dp)]
    reference = make_model()
    model = copy.deepcopy(reference)
    objective.bind(reference.token_space) if hasattr(objective, "bind") else None

    dims = ParallelDims(dp=dp, cp=cp, tp=tp)
    mesh, fsdp_mesh = build_device_mesh(dims, "cpu")
    done = parallelize(model, ParallelPlan(mesh=mesh, fsdp_mesh=fsdp_mesh))
    handle = (ContextParallel(group=mesh.get_group("cp"), rank=mesh.get_local_rank("cp"), world_size=cp, layout=layout)
              if cp > 1 else None)
    d = mesh.get_local_rank("dp")

    # reference: one process, the mean of the dp batch losses
    ref_losses = [objective.step(reference, b)[0] for b in batches]
    torch.stack(ref_losses).mean().backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    loss = _loss(model, objective, batches[d], handle)
    loss.backward()
    diffs = {"loss": abs(float(loss.detach()) - float(ref_losses[d].detach()))}
    with torch.no_grad():
        diffs["hidden"] = float((_hidden(model, objective, batches[d], handle)
                                 - reference(batches[d].input_ids, objective.context(batches[d])).hidden).abs().max())
    model.reshard()  # the root unit stays gathered after a forward without backward (see mmgrow.parallel.fsdp)
    grad_diff, missing = 0.0, []
    for name, p in model.named_parameters():
        if p.grad is None:
            missing.append(name)
            continue
        grad_diff = max(grad_diff, float((_full(p.grad) - ref_grads[name]).abs().max()))
    diffs["grad"] = grad_diff
    diffs["grad_scale"] = max(float(g.abs().max()) for g in ref_grads.values())

    # one AdamW step on both: the sharded optimizer state must give the same next loss
    for params, m in ((list(model.parameters()), model), (list(reference.parameters()), reference)):
        opt = torch.optim.AdamW(params, lr=1e-2)
        opt.step()
        m.zero_grad(set_to_none=True)
    with torch.no_grad():
        diffs["loss_after_step"] = abs(float(_loss(model, objective, batches[d], handle))
                                       - float(objective.step(reference, batches[d])[0]))
    model.reshard()
    sharded = [type(p).__name__ for p in model.parameters()]
    return {"diffs": diffs, "missing": missing, "done": done, "all_dtensor": all(s == "DTensor" for s in sharded),
            "q_local_rows": model.blocks[0].mixer.q_proj.weight.to_local().shape[0]}


LAYOUTS = [
    pytest.param(2, 1, 1, "zigzag", id="fsdp2"),
    pytest.param(1, 1, 2, "zigzag", id="tp2"),
    pytest.param(2, 1, 2, "zigzag", id="fsdp2-tp2"),
    pytest.param(2, 2, 1, "zigzag", id="fsdp2-cp2-zigzag"),
    pytest.param(1, 2, 2, "contiguous", id="cp2-tp2-contiguous"),
]


@pytest.mark.parametrize("dp,cp,tp,layout", LAYOUTS)
def test_parallel_layout_equals_one_float64_process(dp, cp, tp, layout):
    world = dp * cp * tp
    results = run_distributed(_layout_worker, world, dp, cp, tp, layout, timeout=240)
    for rank, r in enumerate(results):
        d = r["diffs"]
        assert not r["missing"], (rank, r["missing"])
        assert r["all_dtensor"], rank  # every parameter sharded (FSDP over dp x cp, or TP)
        assert d["loss"] <= TOL and d["loss_after_step"] <= TOL, (rank, d)
        assert d["hidden"] <= TOL, (rank, d)
        assert d["grad"] <= TOL * max(1.0, d["grad_scale"]), (rank, d)
        assert d["grad_scale"] > 1e-3, d  # the gradients are not trivially zero
        # the heads really are split: 4 query heads x head_dim 8 = 32 rows, over tp and then FSDP's dp x cp
        assert r["q_local_rows"] == 32 // (tp * dp * cp), r
        if tp > 1:
            assert r["done"]["tensor_parallel_layers"] == 4, r["done"]  # 2 attention + 2 MLP layers
        assert r["done"]["fsdp_units"] == 3, r["done"]  # 2 blocks + the root


def _clip_worker(rank: int, world_size: int) -> dict:
    """FSDP x TP (dp 2, tp 2): the mesh-aware gradient norm and clipping equal torch's on one process."""
    from mmgrow.objectives.autoregressive import AutoregressiveObjective
    from mmgrow.parallel.grad_norm import clip_grad_norm
    from mmgrow.parallel.memory import estimate_state_memory
    from mmgrow.parallel.mesh import ParallelDims, build_device_mesh
    from mmgrow.parallel.parallelize import ParallelPlan, parallelize

    objective = AutoregressiveObjective()
    reference = make_model()
    objective.bind(reference.token_space)
    model = copy.deepcopy(reference)
    estimate = estimate_state_memory(model, ParallelDims(dp=2, tp=2), param_bytes=8)  # a float64 model
    mesh, fsdp_mesh = build_device_mesh(ParallelDims(dp=2, tp=2), "cpu")
    parallelize(model, ParallelPlan(mesh=mesh, fsdp_mesh=fsdp_mesh))
    held = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    batches = [make_batch(7), make_batch(8)]
    torch.stack([objective.step(reference, b)[0] for b in batches]).mean().backward()
    objective.step(model, batches[mesh.get_local_rank("dp")])[0].backward()
    want = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.05)
    got = clip_grad_norm(model.parameters(), max_norm=0.05)
    grad = max(float((_full(p.grad) - r.grad).abs().max()) for p, r in zip(model.parameters(), reference.parameters()))
    meshes = {p.device_mesh.mesh_dim_names for p in model.parameters()}
    return {"norm": (float(got), float(want)), "grad": grad, "meshes": sorted(meshes),
            "param_bytes": (held, estimate.parameters)}


def test_gradient_clipping_over_two_meshes_equals_one_process_and_memory_estimate_is_exact():
    results = run_distributed(_clip_worker, 4, timeout=240)
    # mmgrow.parallel.memory's per-rank estimate is exact for the largest rank (FSDP's dim-0 chunks are
    # ceil(n / S) rows, the last rank holds the remainder)
    assert max(r["param_bytes"][0] for r in results) == results[0]["param_bytes"][1], results
    for r in results:
        assert r["meshes"] == [("dp_cp",), ("dp_cp", "tp")], r  # parameters really live on two meshes
        got, want = r["norm"]
        assert want > 0.05 and abs(got - want) <= 1e-12 * want, r  # the clip is active and the norm exact
        assert r["grad"] <= TOL, r
        assert r["param_bytes"][0] <= r["param_bytes"][1], r

def _meta_worker(rank: int, world_size: int) -> dict:
    """Meta-device build, FSDP x TP, materialised shard by shard with the model's own init rule."""
    from torch.distributed.tensor import DTensor

    from mmgrow.models.factories import factory_from_spec
    from mmgrow.models.unified import UnifiedModel
    from mmgrow.parallel.mesh import ParallelDims, build_device_mesh
    from mmgrow.parallel.meta_init import materialize
    from mmgrow.parallel.parallelize import ParallelPlan, parallelize

    mixer = factory_from_spec({"class_path": "full", "init_args": {"num_heads": 4}})
    with torch.device("meta"):
        model = UnifiedModel(token_space={"text": 300}, dim=64, depth=2, mixer=mixer)
    mesh, fsdp_mesh = build_device_mesh(ParallelDims(dp=2, tp=2), "cpu")
    parallelize(model, ParallelPlan(mesh=mesh, fsdp_mesh=fsdp_mesh))
    materialize(model, "cpu", seed=5)
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        full = p.full_tensor()
        digest = hashlib.sha256(local.detach().contiguous().numpy().tobytes()).hexdigest()  # tensors do not
        out[name] = {"local": digest, "std": float(full.std()), "mean": float(full.mean()),  # travel well
                     "rows_unique": int(torch.unique(full, dim=0).shape[0]) if full.dim() == 2 else None,
                     "rows": full.shape[0], "is_meta": p.is_meta}
    again = UnifiedModel(token_space={"text": 300}, dim=64, depth=2, mixer=mixer)  # a normal build, for shapes
    out["_shapes_match"] = all(tuple(model.get_parameter(n).shape) == tuple(q.shape) for n, q in again.named_parameters())
    out["_tp"] = mesh.get_local_rank("tp")
    out["_dp"] = mesh.get_local_rank("dp")
    return out


def test_meta_init_materialises_distinct_shards_and_agreeing_replicas():
    results = run_distributed(_meta_worker, 4, timeout=240)
    r0 = results[0]
    assert r0["_shapes_match"]
    for name, v in r0.items():
        if name.startswith("_"):
            continue
        assert not v["is_meta"], name
        if name.endswith("norm.weight") or ".norm" in name:
            assert v["std"] == 0.0 and v["mean"] == 1.0, (name, v)  # RMSNorm weights start at 1
        elif v["rows_unique"] is not None and "weight" in name:
            assert abs(v["std"] - 0.02) < 0.003, (name, v["std"])  # N(0, init_std)
            assert v["rows_unique"] == v["rows"], name  # no two shards drew the same numbers
    # a parameter that is not tensor-parallel (the embedding) is a replica on the two tp ranks of one dp rank:
    # same local shard there, different shards across dp ranks
    by = {(r["_dp"], r["_tp"]): r for r in results}
    emb = "embed.weight"
    assert by[(0, 0)][emb]["local"] == by[(0, 1)][emb]["local"]
    assert by[(0, 0)][emb]["local"] != by[(1, 0)][emb]["local"]
    q = "backbone.blocks.0.mixer.q_proj.weight"  # tensor-parallel: different shards on the two tp ranks
    assert by[(0, 0)][q]["local"] != by[(0, 1)][q]["local"]
