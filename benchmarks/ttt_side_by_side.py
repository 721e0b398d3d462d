"""mmgrow's TTT-Linear / TTT-MLP layers side by side with the public ttt-lm-pytorch layers (CPU).

Both layers get the same weights (theirs converted by :func:`mmgrow.layers.ttt.from_ttt_lm_pytorch`,
ours built with ``rope_pairing="interleaved"``, no coordinate permutation) and the same input
``x [1, T, D]``, D = 768, H = 12, mini-batch 16 (their ``ttt_linear_base`` / ``ttt_mlp_base``
layer: separate q and k, no conv, no gate). Timings: float32, 1 and 2 threads, forward under
``torch.no_grad`` and forward + backward (``y.sum()`` w.r.t. ``x`` and all parameters), medians of
``--repeats`` runs after a warm-up, ours and theirs interleaved run by run; ratio = theirs / ours.

Agreement (float64, T = 64 by default): relative error ``|y_ours - y_theirs| / |y_theirs|`` (Frobenius)
of the layer outputs and of the gradient w.r.t. ``x``, (a) as their code runs, and (b) with its two
float32 computations lifted to float64 in this process only (their RoPE cos/sin, computed in float32
by design, and their ``1/arange(1..b)`` token buffer, created in float32). TTT-MLP differs further by
their ``gelu_bwd``'s rounded constants (0.79788456, 0.1070322243). Finally the float64 reference of
their TTT-Linear layer written in ``tests/unit/test_ttt_rope_pairing.py`` (from the equations, no
code of theirs) is checked against their code once.

Their file imports ``transformers`` (present in the project's venv); nothing is installed. Usage::

    python benchmarks/ttt_side_by_side.py --peer /path/to/ttt-lm-pytorch     # a checkout, or its ttt.py
    python benchmarks/ttt_side_by_side.py                                    # no peer: skipped

Writes ``benchmarks/results/ttt_side_by_side.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

D, H, MINI_BATCH = 768, 12, 16


def load_peer(path: Path):
    """Import their ``ttt.py`` (from a checkout directory or the file itself) as a module."""
    file = path / "ttt.py" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--peer: no ttt.py at {file}")
    spec = importlib.util.spec_from_file_location("peer_ttt", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_pair(peer, kind: str, dim: int = D, heads: int = H, mini_batch: int = MINI_BATCH, seed: int = 0):
    """Their layer with seeded random weights (projections N(0, 0.02), inner weights and norms moved off
    their symmetric inits) and ours loaded from its state dict."""
    from mmgrow.layers.ttt import TTTMLP, TTTLinear, from_ttt_lm_pytorch

    torch.manual_seed(seed)
    config = peer.TTTConfig(hidden_size=dim, num_attention_heads=heads, mini_batch_size=mini_batch,
                            ttt_layer_type=kind, ttt_base_lr=1.0 if kind == "linear" else 0.1)
    theirs = (peer.TTTLinear if kind == "linear" else peer.TTTMLP)(config, layer_idx=0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.02)
            elif name.startswith(("ttt_norm", "learnable", "b1", "b2", "post_norm")):
                p.add_(0.1 * torch.randn_like(p))
    ours = (TTTLinear if kind == "linear" else TTTMLP)(dim=dim, num_heads=heads, mini_batch_size=mini_batch,
                                                       base_lr=config.ttt_base_lr, rope_pairing="interleaved")
    ours.load_state_dict(from_ttt_lm_pytorch(theirs.state_dict(), heads))
    return theirs, ours


def run_theirs(layer, x: torch.Tensor) -> torch.Tensor:
    return layer(x, position_ids=torch.arange(x.shape[1])[None].expand(x.shape[0], -1))


def run_ours(layer, x: torch.Tensor) -> torch.Tensor:
    from mmgrow.protocols import SeqContext

    return layer(x, SeqContext.simple(x.shape[0], x.shape[1]))[0]


def lift_to_float64(peer, layer) -> None:
    """Their two float32 computations in float64 (this process only): RoPE angles and the token buffer."""
    def rope64(self, x, position_ids):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim))
        freqs = position_ids.to(torch.float64)[:, :, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    peer.RotaryEmbedding.forward = rope64
    layer.token_idx = 1.0 / torch.arange(1, layer.mini_batch_size + 1, dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def agreement(peer, kind: str, T: int) -> dict:
    """Float64 relative errors of outputs and input gradients, as shipped and lifted."""
    out = {}
    for lifted in (False, True):
        theirs, ours = build_pair(peer, kind)
        theirs, ours = theirs.double(), ours.double()
        if lifted:
            lift_to_float64(peer, theirs)
        x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        results = []
        for fn, layer in ((run_theirs, theirs), (run_ours, ours)):
            xi = x.clone().requires_grad_(True)
            y = fn(layer, xi)
            (y * torch.cos(torch.arange(y.numel(), dtype=torch.float64)).reshape(y.shape)).sum().backward()
            results.append((y.detach(), xi.grad))
        key = "lifted" if lifted else "as_shipped"
        out[key] = {"output_rel": rel(results[1][0], results[0][0]), "grad_x_rel": rel(results[1][1], results[0][1])}
    return out


def reference_check(peer) -> float:
    """Our test's float64 reference of their TTT-Linear layer vs their code (lifted to float64)."""
    from test_ttt_rope_pairing import peer_layout_weights, reference_ttt_linear

    dim, heads, b, T = 16, 2, 4, 12
    weights = peer_layout_weights(dim, heads, b, seed=3)
    config = peer.TTTConfig(hidden_size=dim, num_attention_heads=heads, mini_batch_size=b, ttt_layer_type="linear")
    theirs = peer.TTTLinear(config, layer_idx=0).double()
    theirs.load_state_dict(weights)
    lift_to_float64(peer, theirs)
    x = torch.randn(1, T, dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        y = run_theirs(theirs, x)[0]
    return rel(reference_ttt_linear(x[0], weights, heads, b), y)


def timings(peer, kind: str, T: int, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    theirs, ours = build_pair(peer, kind)
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(2))
    fns = {"theirs": (run_theirs, theirs), "ours": (run_ours, ours)}

    def forward(name: str) -> float:
        fn, layer = fns[name]
        start = time.perf_counter()
        with torch.no_grad():
            fn(layer, x)
        return time.perf_counter() - start

    def forward_backward(name: str) -> float:
        fn, layer = fns[name]
        xi = x.clone().requires_grad_(True)
        start = time.perf_counter()
        fn(layer, xi).sum().backward()
        elapsed = time.perf_counter() - start
        layer.zero_grad(set_to_none=True)
        return elapsed

    row: dict = {"kind": kind, "T": T, "threads": threads}
    for mode, measure in (("forward", forward), ("forward_backward", forward_backward)):
        times: dict[str, list[float]] = {"theirs": [], "ours": []}
        for i in range(repeats + 1):  # the first round is the warm-up
            for name in ("theirs", "ours"):
                t = measure(name)
                if i:
                    times[name].append(t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        row[mode] = {"theirs_s": med["theirs"], "ours_s": med["ours"], "ratio": med["theirs"] / med["ours"],
                     "times_s": times}
        print(f"{kind:>6} T={T:>5} threads={threads} {mode:>16}: theirs {med['theirs'] * 1e3:8.1f} ms, ours "
              f"{med['ours'] * 1e3:8.1f} ms, ratio {med['theirs'] / med['ours']:.2f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", type=Path, default=None, help="ttt-lm-pytorch checkout (or its ttt.py)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kinds", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check-T", type=int, default=64, help="sequence length of the float64 agreement check")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ttt_side_by_side.json")
    args = ap.parse_args()
    if args.peer is None:
        print("ttt_side_by_side: no --peer given (a ttt-lm-pytorch checkout); skipped")
        return
    peer = load_peer(args.peer)
    result: dict = {"device": f"{platform.processor() or platform.machine()} CPU", "torch": torch.__version__,
                    "D": D, "H": H, "mini_batch": MINI_BATCH, "repeats": args.repeats, "peer": str(args.peer)}
    result["reference_vs_theirs_rel"] = reference_check(peer)
    print(f"test reference vs their TTT-Linear (float64): {result['reference_vs_theirs_rel']:.2e}", flush=True)
    result["agreement"] = {}
    for kind in args.kinds:
        result["agreement"][kind] = agreement(peer, kind, args.check_T)
        print(f"{kind} float64 agreement: {json.dumps(result['agreement'][kind])}", flush=True)
    peer = load_peer(args.peer)  # fresh module: the timed code is theirs as shipped (float32 anyway)
    result["rows"] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for threads in args.threads:
        for T in args.lengths:
            for kind in args.kinds:
                result["rows"].append(timings(peer, kind, T, threads, args.repeats))
                args.out.write_text(json.dumps(result, indent=1))  # after every row: long runs keep what they have


if __name__ == "__main__":
    main()
