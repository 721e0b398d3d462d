"""Per-rank peak memory of the context-parallel transports under grouped-query attention (CPU, gloo).

One forward + backward of causal attention over ``T`` tokens sharded zigzag on ``W`` processes, with
``H`` query heads and ``Hk`` key/value heads: the ring (:func:`mmgrow.ops.ring.ring_attention`), its
lean mode, and the all-gather transport (:func:`mmgrow.ops.ring_allgather.allgather_attention`). Peak
memory per rank is measured as in ``attention_scaling.py`` (:class:`PeakRSS` after a warm-up pass);
the time is the same pass's wall time on whatever CPU is free (not a speed benchmark).

    python benchmarks/ring_transport_memory.py --world 4 --length 8192 --heads 8 --kv-heads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from attention_scaling import BLOCK, PeakRSS, _return_freed_memory


def _worker(rank: int, world: int, T: int, heads: int, kv_heads: int, head_dim: int, method: str,
            store_path: str, results) -> None:
    import torch.distributed as dist

    from mmgrow.ops.ring import ring_attention
    from mmgrow.ops.ring_allgather import allgather_attention
    from mmgrow.ops.token_meta import TokenMeta
    from mmgrow.parallel.sharding import local_stream_index
    from mmgrow.protocols import ContextParallel, MaskSpec

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world, layout="zigzag")
    local = T // world
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(1, heads, local, head_dim, generator=g).requires_grad_()
    k, v = (torch.randn(1, kv_heads, local, head_dim, generator=g).requires_grad_() for _ in range(2))
    grad = torch.randn(1, heads, local, head_dim, generator=g)
    index = local_stream_index(cp, local)[None]
    meta = TokenMeta(index, index)

    def run() -> None:
        if method == "allgather":
            out, _ = allgather_attention(q, k, v, meta, MaskSpec(), cp, q_block=BLOCK, k_block=BLOCK)
        else:
            out, _ = ring_attention(q, k, v, meta, MaskSpec(), cp, q_block=BLOCK, k_block=BLOCK,
                                    lean=method == "ringlean")
        torch.autograd.backward(out, grad)
        for t in (q, k, v):
            t.grad = None

    run()  # one-time allocations first
    _return_freed_memory()
    dist.barrier()
    start = time.perf_counter()
    with PeakRSS() as memory:
        run()
    results.put((rank, time.perf_counter() - start, memory.mb))
    dist.barrier()
    dist.destroy_process_group()


def measure(method: str, world: int, T: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, T, heads, kv_heads, head_dim, method, f"{tmp}/store", results),
                           nprocs=world, start_method="spawn")
        rows = sorted(results.get() for _ in range(world))
    return {"method": method, "W": world, "T": T, "H": heads, "Hk": kv_heads, "hd": head_dim,
            "peak_mb_max_rank": round(max(r[2] for r in rows), 1), "time_s_under_load": round(max(r[1] for r in rows), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["ring", "ringlean", "allgather"])
    a = p.parse_args()
    for method in a.methods:
        print(json.dumps(measure(method, a.world, a.length, a.heads, a.kv_heads, a.head_dim)), flush=True)


if __name__ == "__main__":
    main()
