"""Linear-time mixers and TTT memories: forward time against sequence length, chunked vs per-token.

Each method runs one forward pass of the *op* (no projections) under ``torch.no_grad`` on
``B = 1`` random inputs; time is the median of ``--repeats`` passes after one warm-up pass, all in
this process (CPU, float32 by default). ``--backward`` times forward + backward instead (the inputs and
the TTT inner parameters require grad; ``out.sum().backward()``), into its own result file and section.
Methods:

* ``mamba2_chunked`` / ``mamba2_recurrent``: :func:`mmgrow.ops.ssd.ssd_chunked` (chunk 64) and the
  per-token :func:`mmgrow.ops.ssd.ssd_recurrent` (H heads, P = N = head_dim, one B/C group);
* ``gdn_chunked`` / ``gdn_recurrent``: :func:`mmgrow.ops.gated_delta.gated_delta_chunked` (chunk 64,
  WY/UT form) and :func:`mmgrow.ops.gated_delta.gated_delta_recurrent` (K = V = head_dim, L2-normalised k);
* ``ttt_linear_dual`` / ``ttt_linear_primal`` and ``ttt_mlp_dual`` / ``ttt_mlp_primal``: the TTT mini-batch
  forms (mini-batch 16, LM flavour: causal inside the mini-batch, 1/t token scale);
* ``fla_*`` (only when ``fla`` imports, e.g. ``PYTHONPATH=/path/to/fla``): flash-linear-attention's
  pure-PyTorch reference functions on the same shapes, timed in the same run — ``fla_gdn_chunk`` /
  ``fla_gdn_recurrent`` (``naive_chunk_gated_delta_rule`` / ``naive_recurrent_gated_delta_rule``) and
  ``fla_simple_gla_chunk`` / ``fla_simple_gla_recurrent`` (scalar-decay linear attention, the SSD
  recurrence without the step size).

    python benchmarks/mixer_scaling.py                                  # CPU table in docs/benchmarks.md
    python benchmarks/mixer_scaling.py --backward --methods ttt_linear_dual ttt_mlp_dual   # forward + backward
    PYTHONPATH=/tmp/fla python benchmarks/mixer_scaling.py              # with FLA's references
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

CHUNK = 64
MINI_BATCH = 16
GRAD = {"on": False}
"""``--backward``: the random inputs are leaves that require grad."""


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _leaves(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs as leaves (requiring grad under ``--backward``), so every timed run builds its own graph."""
    return tuple(t.detach().requires_grad_(GRAD["on"]) for t in tensors)


def _ssd_inputs(T: int, H: int, d: int):
    x = _randn(1, T, H, d, seed=0)
    dt = torch.nn.functional.softplus(_randn(1, T, H, seed=1) - 3.0)
    A = -torch.linspace(1.0, 16.0, H)
    Bm, Cm = _randn(1, T, 1, d, seed=2), _randn(1, T, 1, d, seed=3)
    return _leaves(x, dt, A, Bm, Cm)


def _gdn_inputs(T: int, H: int, d: int):
    q = torch.nn.functional.normalize(_randn(1, T, H, d, seed=0), dim=-1)
    k = torch.nn.functional.normalize(_randn(1, T, H, d, seed=1), dim=-1)
    v = _randn(1, T, H, d, seed=2)
    g = -torch.nn.functional.softplus(_randn(1, T, H, seed=3)) * 0.1
    beta = torch.sigmoid(_randn(1, T, H, seed=4))
    return _leaves(q, k, v, g, beta)


def build(method: str, T: int, H: int, d: int) -> Callable[[], object]:
    """A no-argument callable running ``method`` once at length ``T``."""
    if method.startswith("mamba2_"):
        from mmgrow.ops import ssd

        x, dt, A, Bm, Cm = _ssd_inputs(T, H, d)
        if method == "mamba2_chunked":
            return lambda: ssd.ssd_chunked(x, dt, A, Bm, Cm, chunk_size=CHUNK)
        return lambda: ssd.ssd_recurrent(x, dt, A, Bm, Cm)
    if method.startswith("gdn_"):
        from mmgrow.ops import gated_delta

        q, k, v, g, beta = _gdn_inputs(T, H, d)
        if method == "gdn_chunked":
            return lambda: gated_delta.gated_delta_chunked(q, k, v, g, beta, chunk_size=CHUNK)
        return lambda: gated_delta.gated_delta_recurrent(q, k, v, g, beta)
    if method.startswith("ttt_"):
        return _build_ttt(method, T, H, d)
    if method.startswith("fla_gdn_"):
        from fla.ops.gated_delta_rule import naive

        q, k, v, g, beta = _gdn_inputs(T, H, d)
        if method == "fla_gdn_chunk":  # FLA's argument order differs between its two references
            return lambda: naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=CHUNK)
        return lambda: naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g)
    if method.startswith("fla_simple_gla_"):
        from fla.ops.simple_gla import naive

        x, dt, A, Bm, Cm = _ssd_inputs(T, H, d)
        q, k, g = Cm.expand(1, T, H, d), Bm.expand(1, T, H, d), dt * A
        if method == "fla_simple_gla_chunk":
            return lambda: naive.naive_chunk_simple_gla(q, k, x, g, chunk_size=CHUNK)
        return lambda: naive.naive_recurrent_simple_gla(q, k, x, g)
    raise ValueError(f"unknown method {method!r}")


def _build_ttt(method: str, T: int, H: int, d: int) -> Callable[[], object]:
    from mmgrow.ops.ttt_dual import ttt_dual
    from mmgrow.ops.ttt_inner import InnerParams, inner_shapes
    from mmgrow.ops.ttt_primal import ttt_primal

    kind, form = method.split("_")[1:]
    q = torch.nn.functional.normalize(_randn(1, H, T, d, seed=0), dim=-1)
    k = torch.nn.functional.normalize(_randn(1, H, T, d, seed=1), dim=-1)
    target = _randn(1, H, T, d, seed=2) - k
    base_lr = 1.0 if kind == "linear" else 0.1
    lr = base_lr * torch.sigmoid(_randn(1, H, T, seed=3)) / d
    q, k, target, lr = _leaves(q, k, target, lr)
    token_scale = 1.0 / (torch.arange(T) % MINI_BATCH + 1.0)  # the LM flavour's 1/t' (offsets 0)
    shapes = inner_shapes(kind, d)
    params = InnerParams(weights=list(_leaves(*[0.02 * _randn(H, i, o, seed=4 + n) for n, (i, o) in enumerate(shapes)])),
                         biases=list(_leaves(*[torch.zeros(H, o) for _, o in shapes])),
                         ln_weight=_leaves(torch.ones(H, d))[0], ln_bias=_leaves(torch.zeros(H, d))[0])
    fn = ttt_dual if form == "dual" else ttt_primal
    return lambda: fn(q, k, target, lr, token_scale, params, mini_batch_size=MINI_BATCH)


def fla_importable() -> bool:
    try:
        import fla.ops.gated_delta_rule.naive  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False
    return True


def measure(method: str, T: int, repeats: int, H: int, d: int, backward: bool = False) -> dict:
    GRAD["on"] = backward
    run = build(method, T, H, d)

    def once() -> None:
        out = run()
        if backward:
            (out[0] if isinstance(out, tuple) else out).sum().backward()

    with torch.set_grad_enabled(backward):
        once()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return {"method": method, "T": T, "time_s": statistics.median(times), "times_s": times}


def slope(rows: list[dict], method: str) -> float | None:
    """Least-squares exponent of time against T over all measured lengths."""
    pts = [(math.log(r["T"]), math.log(r["time_s"])) for r in rows if r["method"] == method]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


PAIRS = [("mamba2_chunked", "mamba2_recurrent", 4096, 10.0), ("gdn_chunked", "gdn_recurrent", 4096, 10.0),
         ("ttt_linear_dual", "ttt_linear_primal", 2048, 5.0), ("ttt_mlp_dual", "ttt_mlp_primal", 2048, 3.0)]
"""(fast, reference, T, goal): the issue's speed-up goals."""
LINEAR = ["mamba2_chunked", "gdn_chunked", "ttt_linear_dual", "ttt_mlp_dual"]
"""Methods whose time must grow linearly with T (goal: log-log slope <= 1.1)."""


def summarise(rows: list[dict]) -> dict:
    by = {(r["method"], r["T"]): r["time_s"] for r in rows}
    out: dict = {"speedups": [], "slopes": {}, "fla_ratios": []}
    for fast, ref, T, goal in PAIRS:
        if (fast, T) in by and (ref, T) in by:
            out["speedups"].append({"fast": fast, "reference": ref, "T": T, "speedup": by[(ref, T)] / by[(fast, T)],
                                    "goal": goal})
    for method in dict.fromkeys(r["method"] for r in rows):
        out["slopes"][method] = slope(rows, method)
    for ours, theirs in (("gdn_chunked", "fla_gdn_chunk"), ("gdn_recurrent", "fla_gdn_recurrent"),
                         ("mamba2_chunked", "fla_simple_gla_chunk"), ("mamba2_recurrent", "fla_simple_gla_recurrent")):
        for T in sorted({r["T"] for r in rows}):
            if (ours, T) in by and (theirs, T) in by:
                out["fla_ratios"].append({"ours": ours, "fla": theirs, "T": T, "fla_over_ours": by[(theirs, T)] / by[(ours, T)]})
    return out


def write_doc(result: dict, backward: bool = False) -> None:
    from _report import update_benchmarks_md

    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["T"] for r in rows})
    by = {(r["method"], r["T"]): r["time_s"] for r in rows}
    s = result["summary"]
    table = [[m] + [f"{by[(m, T)] * 1000:.1f}" if (m, T) in by else "-" for T in lengths]
             + [f"{s['slopes'][m]:.2f}" if s["slopes"].get(m) is not None else "-"] for m in methods]
    lines = [f"- {p['fast']} vs {p['reference']} at T={p['T']}: **{p['speedup']:.1f}x** faster "
             f"(goal >= {p['goal']:g}x{'' if p['speedup'] >= p['goal'] else ': NOT MET'})" for p in s["speedups"]]
    for m in LINEAR:
        if s["slopes"].get(m) is not None:
            ok = s["slopes"][m] <= 1.1
            lines.append(f"- {m} log-log slope over T={lengths[0]}..{lengths[-1]}: {s['slopes'][m]:.2f} "
                         f"(goal <= 1.1{'' if ok else ': NOT MET'})")
    for r in s["fla_ratios"]:
        lines.append(f"- FLA's `{r['fla']}` / our `{r['ours']}` at T={r['T']}: {r['fla_over_ours']:.2f}")
    if not s["fla_ratios"]:
        lines.append("- FLA's pure-PyTorch references were not importable in this run (no comparison).")
    what = ("forward + backward (`out.sum().backward()`)" if backward else
            "one forward pass of the op under `torch.no_grad`")
    note = (f"Cells: median time (ms) of {what} (no projections), "
            f"{result['dtype']}, B=1, H={result['heads']}, head_dim={result['head_dim']} (SSD: P=N=head_dim, one "
            f"B/C group; GDN: K=V=head_dim), chunk {CHUNK}, TTT mini-batch {MINI_BATCH} (LM flavour); "
            f"{result['repeats']} repeats after a warm-up. Last column: least-squares exponent of time vs T.\n\n"
            + "\n".join(lines))
    name, title, command = ("mixers_cpu", "Linear-time mixers and TTT vs sequence length (CPU)",
                            "python benchmarks/mixer_scaling.py")
    if backward:
        name, title = "mixers_cpu_backward", "Linear-time mixers and TTT, forward + backward, vs sequence length (CPU)"
        command = f"python benchmarks/mixer_scaling.py --backward --methods {' '.join(methods)}"
    update_benchmarks_md(name, title, command, result["device"],
                         ["method"] + [f"T={T}" for T in lengths] + ["slope"], table, note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--max-reference-T", type=int, default=16384,
                    help="skip per-token / primal methods above this length (they are the slow ones)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = args.methods or ["mamba2_chunked", "mamba2_recurrent", "gdn_chunked", "gdn_recurrent",
                               "ttt_linear_dual", "ttt_linear_primal", "ttt_mlp_dual", "ttt_mlp_primal"]
    if args.methods is None and fla_importable():
        methods += ["fla_gdn_chunk", "fla_gdn_recurrent", "fla_simple_gla_chunk", "fla_simple_gla_recurrent"]
    slow = ("recurrent", "primal")
    rows = []
    for T in args.lengths:
        for method in methods:
            if method.endswith(slow) and T > args.max_reference_T:
                continue
            row = measure(method, T, args.repeats, args.heads, args.head_dim, args.backward)
            rows.append(row)
            print(f"{method:>26} T={T:>6}  {row['time_s'] * 1000:10.1f} ms", flush=True)
    result = {"device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
              "dtype": "torch.float32", "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats,
              "torch": torch.__version__, "rows": rows, "summary": summarise(rows)}
    result["mode"] = "forward_backward" if args.backward else "forward"
    default_out = "mixers_cpu_backward.json" if args.backward else "mixers_cpu.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    if not args.no_doc:
        write_doc(result, args.backward)


if __name__ == "__main__":
    main()
