"""Attention backends: time and peak memory of one forward + backward pass against sequence length.

Methods (all causal, ``B = 1``; ``W`` = window):

* ``dense``: materialised ``[T, T]`` boolean mask and scores (:func:`mmgrow.ops.attention_ref.dense_attention`);
* ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` (its fastest kernel for the device);
* ``sdpa_window_mask``: SDPA with a dense ``[T, T]`` boolean causal-window mask (the baseline a window
  is usually run with);
* ``blockwise`` / ``blockwise_window``: :func:`mmgrow.ops.blockwise.blockwise_attention` (512 x 512 tiles);
* ``sliding_window``: :func:`mmgrow.ops.sliding_window.windowed_attention`, what the mixer runs (window
  tiles for ``W = 512``); ``sliding_window_chunks``: the vectorised chunks (the kernel for small windows);
* ``flex`` / ``flex_window`` (CUDA only): FlexAttention with a block mask (:mod:`mmgrow.ops.flex`);
* ``ring_P`` (CPU only): :func:`mmgrow.ops.ring.ring_attention` over ``P`` gloo processes holding
  ``T / P`` tokens each (zigzag layout, fused per-hop kernel); time and memory are per rank (the slowest /
  largest rank); ``ringlean_P``: the same in the lean mode (``lean=True``: K/V chunks straight from
  their owner, partial ``dK, dV`` straight back).

CPU: every (method, T) runs in a fresh subprocess. Time is the median of ``--repeats`` passes after a
first (warm-up) pass. Then freed memory is made to leave the resident set (glibc
``mallopt(M_MMAP_THRESHOLD)``, heap trimmed) and peak memory is the highest resident set sampled
during one more pass minus the resident set before it (:class:`PeakRSS`). CUDA: in one process, peak is
``torch.cuda.max_memory_allocated`` above the inputs, time the median of CUDA-event timings.

    python benchmarks/attention_scaling.py --device cpu                     # float32, the CPU table
    python benchmarks/attention_scaling.py --device cuda --dtype bfloat16   # the GPU table
    python benchmarks/attention_scaling.py --methods blockwise ring_2 ringlean_2 --lengths 16384 --merge
        # re-measure some rows and merge them into the saved result (and the doc table)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

WINDOW = 512
BLOCK = 512


def _meta(T: int, device: str, offset: int = 0, length: int | None = None):
    from mmgrow.ops.token_meta import TokenMeta

    index = torch.arange(offset, offset + (T if length is None else length), device=device)[None]
    return TokenMeta(index, index)


def _spec(window: bool):
    from mmgrow.protocols import MaskSpec

    return MaskSpec(causal=True, window=WINDOW if window else None)


def build(method: str, T: int, device: str, dtype: torch.dtype, heads: int, head_dim: int):
    """``(inputs, run)``: ``run()`` does one forward + backward of ``method`` on fresh-gradient inputs."""
    from torch.nn import functional as F

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, T, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(1, heads, T, head_dim, generator=g).to(device, dtype)
    meta = _meta(T, device)

    def backward(out: torch.Tensor) -> None:
        torch.autograd.backward(out, grad)
        for t in (q, k, v):
            t.grad = None

    if method == "dense":
        from mmgrow.ops.attention_ref import dense_attention
        from mmgrow.ops.token_meta import tile_mask

        def run():
            backward(dense_attention(q, k, v, tile_mask(meta, meta, _spec(False)))[0])
    elif method == "sdpa":
        def run():
            backward(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    elif method == "sdpa_window_mask":
        from mmgrow.ops.token_meta import tile_mask

        def run():
            mask = tile_mask(meta, meta, _spec(True))[:, None]
            backward(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    elif method in ("blockwise", "blockwise_window"):
        from mmgrow.ops.blockwise import blockwise_attention

        spec = _spec(method.endswith("window"))

        def run():
            backward(blockwise_attention(q, k, v, meta, meta, spec, q_block=BLOCK, k_block=BLOCK)[0])
    elif method == "sliding_window":
        from mmgrow.ops.sliding_window import windowed_attention

        def run():
            backward(windowed_attention(q, k, v, meta, _spec(True))[0])
    elif method == "sliding_window_chunks":
        from mmgrow.ops.sliding_window import sliding_window_attention

        def run():
            backward(sliding_window_attention(q, k, v, meta, _spec(True))[0])
    elif method in ("flex", "flex_window"):
        from mmgrow.ops.flex import block_mask_for, flex_masked_attention

        spec = _spec(method.endswith("window"))
        holder = type("Holder", (), {})()
        block_mask_for(meta, meta, spec, holder)  # built once, reused like one context for all layers

        def run():
            backward(flex_masked_attention(q, k, v, meta, meta, spec, owner=holder)[0])
    else:
        raise ValueError(f"unknown method {method!r}")
    return (q, k, v, grad), run


def _rss_mb() -> float:
    """Resident set size now (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _return_freed_memory() -> None:
    """From now on, allocations of 64 KiB or more are their own mappings, returned to the system when
    freed (glibc ``mallopt(M_MMAP_THRESHOLD)``), and the heap is trimmed: the resident set then
    follows live memory. Set only for the memory pass: it makes every large allocation page-fault
    afresh, which would distort the timings of kernels that allocate per tile."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


class PeakRSS:
    """Highest resident set size seen while the ``with`` block runs (sampled every 0.2 ms by a thread),
    minus the resident set size at its start: the memory the block itself holds at its peak, after
    a first pass has made every one-time allocation (thread pools, communication buffers, kernel
    workspaces). Use after :func:`_return_freed_memory`."""

    def __enter__(self) -> Self:
        import threading

        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_mb())
                self._stop.wait(0.0002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def mb(self) -> float:
        return self.peak - self.base


def measure_cpu(method: str, T: int, repeats: int, heads: int, head_dim: int) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    _, run = build(method, T, "cpu", torch.float32, heads, head_dim)
    start = time.perf_counter()
    run()  # the first pass makes the one-time allocations (and warms up)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats if first < 60 else 1):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    _return_freed_memory()
    with PeakRSS() as memory:
        run()
    peak = memory.mb
    return {"method": method, "T": T, "time_s": statistics.median(times), "times_s": times, "peak_mb": peak}


def _ring_worker(rank: int, world: int, T: int, repeats: int, heads: int, head_dim: int, store_path: str,
                 results, lean: bool) -> None:
    import torch.distributed as dist

    from mmgrow.ops.ring import ring_attention
    from mmgrow.parallel.sharding import local_stream_index
    from mmgrow.protocols import ContextParallel

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    cp = ContextParallel(group=dist.group.WORLD, rank=rank, world_size=world, layout="zigzag")
    local = T // world
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, heads, local, head_dim, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(1, heads, local, head_dim, generator=g)
    from mmgrow.ops.token_meta import TokenMeta

    index = local_stream_index(cp, local)[None]
    meta = TokenMeta(index, index)

    def run(q=q, k=k, v=v, grad=grad, meta=meta):
        out, _ = ring_attention(q, k, v, meta, _spec(False), cp, q_block=BLOCK, k_block=BLOCK, lean=lean)
        torch.autograd.backward(out, grad)
        for t in (q, k, v):
            t.grad = None

    run()  # the first pass makes the one-time allocations (gloo buffers, thread pools), as in measure_cpu
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    _return_freed_memory()
    dist.barrier()
    with PeakRSS() as memory:
        run()
    peak = memory.mb
    results.put((rank, statistics.median(times), peak))
    dist.barrier()
    dist.destroy_process_group()


def measure_ring(world: int, T: int, repeats: int, heads: int, head_dim: int, lean: bool = False) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_ring_worker, args=(world, T, repeats, heads, head_dim, f"{tmp}/store", results, lean),
                           nprocs=world, start_method="spawn")
        rows = [results.get() for _ in range(world)]
    return {"method": f"{'ringlean' if lean else 'ring'}_{world}", "T": T, "time_s": max(r[1] for r in rows), "peak_mb": max(r[2] for r in rows),
            "per_rank": sorted(rows)}


def measure_cuda(method: str, T: int, repeats: int, dtype: torch.dtype, heads: int, head_dim: int) -> dict:
    torch.cuda.empty_cache()
    _, run = build(method, T, "cuda", dtype, heads, head_dim)
    run()  # warm-up: compilation, block masks, allocator
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return {"method": method, "T": T, "time_s": statistics.median(times), "times_s": times, "peak_mb": peak}


def slope(rows: list[dict], method: str, lo: int, hi: int) -> float | None:
    """Least-squares exponent of time against T over ``lo <= T <= hi``."""
    pts = [(math.log(r["T"]), math.log(r["time_s"])) for r in rows if r["method"] == method and lo <= r["T"] <= hi]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--rings", type=int, nargs="*", default=[2, 4], help="CPU: ring world sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the measured (method, T) rows of the saved result, keep the others")
    ap.add_argument("--doc-from", default=None, help="rewrite docs/benchmarks.md from a saved JSON result")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.doc_from:  # e.g. a result measured on a GPU machine
        result = json.loads(Path(args.doc_from).read_text())
        args.device = result["on"]
        write_doc(result, args)
        return
    cuda = args.device == "cuda"
    heads = args.heads or (8 if cuda else 2)
    if args.worker:  # one CPU measurement in this fresh process
        method, T = args.worker[0], int(args.worker[1])
        row = (measure_ring(int(method.split("_")[1]), T, args.repeats, heads, args.head_dim,
                            lean=method.startswith("ringlean_"))
               if method.startswith(("ring_", "ringlean_")) else measure_cpu(method, T, args.repeats, heads, args.head_dim))
        print(json.dumps(row))
        return

    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    methods = args.methods or (["dense", "sdpa", "sdpa_window_mask", "flex", "flex_window", "blockwise",
                                "sliding_window", "sliding_window_chunks"] if cuda else
                               ["dense", "sdpa", "sdpa_window_mask", "blockwise", "sliding_window",
                                "sliding_window_chunks"] + [f"{kind}_{p}" for kind in ("ring", "ringlean")
                                                              for p in args.rings])
    rows = []
    for T in args.lengths:
        for method in methods:
            if cuda:
                row = measure_cuda(method, T, args.repeats, dtype, heads, args.head_dim)
            else:
                cmd = [sys.executable, __file__, "--worker", method, str(T), "--repeats", str(args.repeats),
                       "--heads", str(heads), "--head-dim", str(args.head_dim)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{method} at T={T} failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method:>18} T={T:>6}  {row['time_s'] * 1000:10.1f} ms  peak {row['peak_mb']:9.1f} MB", flush=True)
    device_name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"attention_{args.device}.json")
    merged: list[str] = []
    if args.merge and out.exists():  # keep the rows not re-measured now (and their order)
        old = json.loads(out.read_text())
        new = {(r["method"], r["T"]): r for r in rows}
        merged = list(dict.fromkeys(old.get("merged", []) + [f"{m} T={T}" for m, T in new]))  # since the full run
        kept = [new.pop((r["method"], r["T"]), r) for r in old["rows"]]
        rows = kept + list(new.values())
        methods = list(dict.fromkeys(r["method"] for r in rows))
        args.lengths = sorted({r["T"] for r in rows})
    summary = summarise(rows, methods, args.lengths)
    result = {"on": args.device, "merged": merged, "device": device_name, "dtype": str(dtype), "heads": heads, "head_dim": args.head_dim,
              "window": WINDOW, "block": BLOCK, "torch": torch.__version__, "rows": rows, "summary": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    if not args.no_doc:
        write_doc(result, args)


def summarise(rows: list[dict], methods: list[str], lengths: list[int]) -> dict:
    by = {(r["method"], r["T"]): r for r in rows}
    T = max(lengths)
    s: dict = {"T": T}
    if ("dense", T) in by and ("blockwise", T) in by:
        s["blockwise_over_dense_peak"] = by[("blockwise", T)]["peak_mb"] / by[("dense", T)]["peak_mb"]
    if ("sdpa_window_mask", T) in by and ("sliding_window", T) in by:
        s["sliding_window_speedup_vs_masked_sdpa"] = by[("sdpa_window_mask", T)]["time_s"] / by[("sliding_window", T)]["time_s"]
    s["sliding_window_slope_2k_16k"] = slope(rows, "sliding_window", 2048, 16384)
    for m in methods:
        if m.startswith(("ring_", "ringlean_")) and (m, T) in by and ("blockwise", T) in by:
            p = int(m.split("_")[1])
            s[f"{m}_peak_times_P_over_blockwise"] = by[(m, T)]["peak_mb"] * p / by[("blockwise", T)]["peak_mb"]
    return s


def write_doc(result: dict, args: argparse.Namespace) -> None:
    from _report import update_benchmarks_md

    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["T"] for r in rows})
    by = {(r["method"], r["T"]): r for r in rows}
    loaded = set(result.get("merged", []))  # re-measured cells: their times carry a mark (measured under load)

    def cell(m: str, T: int) -> str:
        mark = "†" if f"{m} T={T}" in loaded else ""
        return f"{by[(m, T)]['time_s'] * 1000:.1f}{mark} / {by[(m, T)]['peak_mb']:.0f}" if (m, T) in by else "-"

    table = [[m] + [cell(m, T) for T in lengths] for m in methods]
    s = result["summary"]
    goals = []
    if result["on"] == "cuda":  # the goals are CPU goals; on a GPU, report the fused kernels
        T = max(lengths)
        for name, ref in (("flex", "sdpa"), ("flex_window", "sdpa_window_mask"), ("sliding_window", "sdpa_window_mask")):
            if (name, T) in by and (ref, T) in by:
                goals.append(f"{name} / {ref} time at T={T}: {by[(name, T)]['time_s'] / by[(ref, T)]['time_s']:.2f}")
        goals.append("On CUDA the attention mixers run the fused kernels (`kernel: auto`): SDPA flash for plain "
                     "causal, FlexAttention (`flex`, `flex_window` rows) for masks; `blockwise` and "
                     "`sliding_window` rows are their pure-PyTorch native paths.")
        s = {}
    if "blockwise_over_dense_peak" in s:
        goals.append(f"blockwise peak / dense peak at T={s['T']}: {s['blockwise_over_dense_peak']:.3f} (goal <= 0.125)")
    if "sliding_window_speedup_vs_masked_sdpa" in s:
        goals.append(f"sliding_window (W={WINDOW}) speed-up over SDPA with a dense mask at T={s['T']}: "
                     f"{s['sliding_window_speedup_vs_masked_sdpa']:.1f}x (goal >= 5)")
    if s.get("sliding_window_slope_2k_16k") is not None:
        goals.append(f"sliding_window time exponent over 2K-16K: {s['sliding_window_slope_2k_16k']:.2f} (goal <= 1.15)")
    for key, value in s.items():
        if key.endswith("_peak_times_P_over_blockwise"):
            goals.append(f"{key.split('_peak')[0]} per-rank peak x P / blockwise peak: {value:.2f} (goal <= 1.3)")
    cmd = f"python benchmarks/attention_scaling.py --device {args.device}" + (f" --dtype {args.dtype}" if args.dtype else "")
    if result.get("merged"):  # say which cells this run re-measured
        cmd += " --merge --methods ... --lengths ..."
        goals.append(f"Cells re-measured on {_dt.date.today().isoformat()} with `--merge`: "
                     f"{', '.join(result['merged'])}; all other cells come from the previous full run. The "
                     "re-measured cells ran on a shared, loaded CPU: their memory is reliable, their times (marked "
                     "†) are not (measured under load).")
    note = (f"Cells: median time of one forward+backward (ms) / peak memory above the inputs (MB); {result['dtype']}, "
            f"B=1, H={result['heads']}, head_dim={result['head_dim']}, causal, window {WINDOW}, tiles {BLOCK}. "
            "ring_P: per rank, P processes on the same machine (overlapped ring); ringlean_P: the lean mode "
            "(`lean=True`).\n\n" + "\n".join(f"- {g}" for g in goals))
    update_benchmarks_md(f"attention_{args.device}", f"Attention backends vs sequence length ({args.device})", cmd,
                         result["device"], ["method"] + [f"T={T}" for T in lengths], table, note)


if __name__ == "__main__":
    main()
