"""FSDP2 (and FSDP x TP) per-rank training-state memory against DDP, measured on CPU with gloo.

For P processes and a ~25M-parameter text model (full attention, SwiGLU, AdamW), one training step runs
under each layout and every rank counts the bytes its own tensors hold: parameters (local shards),
gradients, and AdamW's two moments. DDP keeps a full replica of all three on every rank; FSDP over P
ranks should hold 1/P of them (plus dim-0 padding). The numbers are counted, not sampled, so they are
exact and independent of machine load; ``mmgrow.parallel.memory.estimate_state_memory`` is printed
beside them (and must match). Also measured: activation bytes the autograd graph saves per token and
layer (saved-tensor hooks), with and without activation checkpointing -- the part of memory that
scales with tokens per rank.

    python benchmarks/fsdp_memory.py          # P = 2 and 4; writes benchmarks/results/fsdp_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM, DEPTH, VOCAB, HEADS, T, B = 512, 8, 4096, 8, 256, 2
LAYOUTS = {2: [("ddp", 2, 1, False), ("fsdp", 2, 1, True)],
           4: [("ddp", 4, 1, False), ("fsdp", 4, 1, True), ("fsdp_x_tp2", 2, 2, True)]}


def build():
    from mmgrow.models.factories import factory_from_spec
    from mmgrow.models.unified import UnifiedModel

    torch.manual_seed(0)
    mixer = factory_from_spec({"class_path": "full", "init_args": {"num_heads": HEADS}})
    return UnifiedModel(token_space={"text": VOCAB}, dim=DIM, depth=DEPTH, mixer=mixer)


def _bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _batch():
    from mmgrow.batch import TokenBatch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    zeros = torch.zeros_like(ids)
    return TokenBatch(input_ids=ids, modality_ids=zeros, positions=torch.arange(T).expand(B, T).clone(),
                      segment_ids=zeros.clone(), block_ids=torch.full_like(ids, -1),
                      loss_mask=torch.ones(B, T), example_weight=torch.ones(B, T))


def _worker(rank: int, world: int, name: str, dp: int, tp: int, fsdp: bool) -> dict:
    from mmgrow.objectives.autoregressive import AutoregressiveObjective
    from mmgrow.parallel.memory import estimate_state_memory
    from mmgrow.parallel.mesh import ParallelDims, build_device_mesh
    from mmgrow.parallel.parallelize import ParallelPlan, parallelize

    model = build()
    dims = ParallelDims(dp=dp, tp=tp)
    estimate = estimate_state_memory(model, dims, fsdp=fsdp)
    if fsdp:
        mesh, fsdp_mesh = build_device_mesh(dims, "cpu")
        parallelize(model, ParallelPlan(mesh=mesh, fsdp_mesh=fsdp_mesh))
    objective = AutoregressiveObjective()
    objective.bind(model.token_space)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = objective.step(model, _batch())[0]
    loss.backward()
    if not fsdp:  # DDP's all-reduce: every rank ends with the full averaged gradient
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad)
    opt.step()
    params = _bytes(model.parameters())
    grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
    optim = _bytes(v for state in opt.state.values() for k, v in state.items() if k != "step")
    return {"layout": name, "P": world, "dp": dp, "tp": tp, "parameters": params, "gradients": grads,
            "optimizer": optim, "total": params + grads + optim, "estimate_total": estimate.total,
            "n_parameters": sum(p.numel() for p in build().parameters())}


def saved_activation_bytes(checkpointing: bool) -> int:
    """Bytes autograd keeps for backward during one forward of the whole model (one process)."""
    from mmgrow.objectives.autoregressive import AutoregressiveObjective
    from mmgrow.parallel.activation_checkpoint import checkpoint_blocks

    model = build()
    if checkpointing:
        checkpoint_blocks(model)
    objective = AutoregressiveObjective()
    objective.bind(model.token_space)
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):  # weights are not activations
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective.step(model, _batch())
    return sum(seen.values())


def main(argv: list[str] | None = None) -> int:
    from _report import update_benchmarks_md

    from mmgrow.testing.distributed import run_distributed

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/fsdp_memory.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for world, layouts in LAYOUTS.items():
        for name, dp, tp, fsdp in layouts:
            per_rank = run_distributed(_worker, world, name, dp, tp, fsdp, timeout=600)
            worst = max(per_rank, key=lambda r: r["total"])
            rows.append(worst)
            print(f"P={world} {name:>11}: {worst['total'] / 2**20:8.1f} MiB per rank (estimate "
                  f"{worst['estimate_total'] / 2**20:.1f})", flush=True)
    ddp = {r["P"]: r["total"] for r in rows if r["layout"] == "ddp"}
    acts = {"saved_bytes_per_token_per_layer": saved_activation_bytes(False) / (B * T * DEPTH),
            "saved_bytes_per_token_per_layer_checkpointed": saved_activation_bytes(True) / (B * T * DEPTH)}
    result = {"model": {"dim": DIM, "depth": DEPTH, "vocab": VOCAB, "heads": HEADS, "tokens": B * T,
                        "parameters": rows[0]["n_parameters"]}, "rows": rows, "activations": acts}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    table = [[str(r["P"]), r["layout"], f"{r['parameters'] / 2**20:.1f}", f"{r['gradients'] / 2**20:.1f}",
              f"{r['optimizer'] / 2**20:.1f}", f"{r['total'] / 2**20:.1f}", f"{r['estimate_total'] / 2**20:.1f}",
              f"{r['total'] / ddp[r['P']]:.3f}"] for r in rows]
    note = (f"Model: {rows[0]['n_parameters'] / 1e6:.1f}M parameters (dim {DIM}, depth {DEPTH}, vocabulary {VOCAB}, "
            "full attention, float32), AdamW. Bytes are counted per rank after one step (the largest rank shown); "
            "`estimate` is `mmgrow.parallel.memory.estimate_state_memory`. Activations saved for backward "
            f"(one process, {B}x{T} tokens): {acts['saved_bytes_per_token_per_layer'] / 1024:.1f} KiB per token "
            f"and layer, {acts['saved_bytes_per_token_per_layer_checkpointed'] / 1024:.2f} KiB with activation "
            "checkpointing (block inputs, plus what lives outside the blocks: embeddings, final norm, logits; one block is recomputed at a time in backward).")
    update_benchmarks_md("fsdp_memory", "FSDP2 / tensor-parallel training-state memory per rank (cpu)",
                         "python benchmarks/fsdp_memory.py", "x86_64 CPU, gloo",
                         ["P", "layout", "params MiB", "grads MiB", "AdamW MiB", "total MiB", "estimate MiB",
                          "/ DDP"], table, note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
