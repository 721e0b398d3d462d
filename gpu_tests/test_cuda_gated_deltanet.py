"""CUDA checks of the Gated DeltaNet FLA adapter against our chunked op (run on a GPU machine with FLA).

Outside the CPU suite; run with ``PYTHONPATH=. python -m pytest -p no:logging gpu_tests`` on a machine
with CUDA and ``flash-linear-attention``; the module skips itself without them. The oracle is our
chunked op in float64 on the same (rounded) inputs, on the GPU. Tolerances are FLA's own relative-RMS
ratios (``tests/ops/test_gdn.py``): outputs and final state 0.005, dq/dk/dv/dh0 0.008, dg/dbeta 0.02.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mmgrow.layers.gated_deltanet import GatedDeltaNet
from mmgrow.ops import gated_delta_cuda
from mmgrow.ops.gated_delta import gated_delta_chunked
from mmgrow.ops.gated_delta_cuda import fla_available, gated_delta_fla
from mmgrow.protocols import PAD_SEGMENT, SeqContext

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and fla_available("cuda")),
                                reason="needs a CUDA device and flash-linear-attention")

NAMES = ("q", "k", "v", "g", "beta", "initial_state")
RATIO = {"o": 0.005, "state": 0.005, "q": 0.008, "k": 0.008, "v": 0.008, "initial_state": 0.008, "g": 0.02,
         "beta": 0.02}


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def _inputs(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    raw = {"q": torch.randn(B, T, H, K, generator=gen),
           "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
           "v": torch.randn(B, T, H, V, generator=gen),
           "g": F.logsigmoid(torch.rand(B, T, H, generator=gen)),
           "beta": torch.rand(B, T, H, generator=gen).sigmoid(),
           "initial_state": torch.randn(B, H, K, V, generator=gen)}
    out = {}
    for name, t in raw.items():  # g and the state in float32, as FLA takes them
        keep32 = name in ("g", "initial_state")
        out[name] = t.to("cuda", torch.float32 if keep32 else dtype).requires_grad_(True)
    return out


def _run(fn, inputs, reset, **kw):
    o, state = fn(*(inputs[n] for n in NAMES[:5]), initial_state=inputs["initial_state"], reset=reset, **kw)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).cuda()
    dstate = torch.randn(state.shape, generator=gen, dtype=torch.float64).cuda()
    loss = (o.double() * do).sum() + (state.double() * dstate).sum()
    grads = torch.autograd.grad(loss, [inputs[n] for n in NAMES])
    return {"o": o, "state": state, **dict(zip(NAMES, grads, strict=True))}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("B", "T", "reset_at"),
                         [(2, 63, None), (2, 300, [(1, 0)]), (1, 300, [(0, 0), (0, 100), (0, 101)])])
def test_fla_matches_chunked(dtype, B, T, reset_at):
    inputs = _inputs(B, T, 4, 64, 64, dtype)
    reset = None
    if reset_at is not None:
        reset = torch.zeros(B, T, dtype=torch.bool, device="cuda")
        for b, t in reset_at:
            reset[b, t] = True
    try:
        fast = _run(gated_delta_fla, inputs, reset, scale=None)
    except AssertionError as exc:  # some FLA versions accept half precision only
        if dtype == torch.float32 and "float32" in str(exc):
            pytest.skip(f"this FLA version rejects float32: {exc}")
        raise
    oracle_inputs = {n: t.detach().double().requires_grad_(True) for n, t in inputs.items()}
    ref = _run(gated_delta_chunked, oracle_inputs, reset, chunk_size=64)
    bad = {n: round(_rel_rms(fast[n], ref[n]), 5) for n in RATIO if _rel_rms(fast[n], ref[n]) >= RATIO[n]}
    assert not bad, f"relative RMS error above FLA's ratios: {bad}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_auto_uses_fla_and_matches_chunked(dtype, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("reset"))
        return gated_delta_fla(*args, **kwargs)

    monkeypatch.setattr(gated_delta_cuda, "gated_delta_fla", spy)
    torch.manual_seed(0)
    auto = GatedDeltaNet(dim=256, num_heads=4, head_dim=64, kernel="auto").cuda().to(dtype)
    chunked = GatedDeltaNet(dim=256, num_heads=4, head_dim=64, kernel="chunked").cuda().to(dtype)
    chunked.load_state_dict(auto.state_dict())
    T = 200
    x = torch.randn(1, T, 256, device="cuda", dtype=dtype)
    seg = torch.zeros(1, T, dtype=torch.long, device="cuda")
    seg[0, 80:] = 1
    seg[0, 190:] = PAD_SEGMENT
    ctx = SeqContext(positions=torch.arange(T, device="cuda")[None], segment_ids=seg)  # batch 1: cu_seqlens
    results = []
    for layer in (auto, chunked):
        xi = x.clone().requires_grad_(True)
        y, state = layer(xi, ctx)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        results.append((y, state.recurrent, xi.grad, layer.A_log.grad))
    assert len(calls) == 1, "kernel='auto' did not use FLA on CUDA"
    for what, a, b, ratio in zip(("y", "state", "dx", "dA_log"), *results, (0.01, 0.005, 0.02, 0.02), strict=True):
        assert _rel_rms(a, b) < ratio, f"{what}: relative RMS {_rel_rms(a, b):.3g} between kernel auto (FLA) and chunked"
