"""CUDA checks of the mamba-ssm SSD adapter and of Mamba2's ``auto`` kernel (run on a GPU machine).

Outside the CPU suite (no GPU in CI); run with ``PYTHONPATH=. python -m pytest -p no:logging gpu_tests``.
Skipped without CUDA or without an importable ``mamba_ssm.ops.triton.ssd_combined``.

Metric: relative RMS error ``||a - ref|| / ||ref||`` against the float64 chunked op (itself equal to
the per-token recurrence to ~1e-14 on CPU). Tolerances: float32 5e-3 forward / 1e-2 gradients (Triton
may run float32 dot products in TF32, ~1e-3 relative); bf16 3e-2 forward / 6e-2 gradients (mamba-ssm
rounds intermediate states to bf16 before its matmuls; its own selective-scan tests allow
3e-2 / 5e-2 elementwise in bf16, gradients 2-10x looser). These bounds have not yet been run on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from mmgrow.ops.ssd import ssd_chunked
from mmgrow.ops.ssd_cuda import mamba_ssm_available, ssd_mamba_ssm

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and mamba_ssm_available("cuda")),
                                reason="needs a CUDA device and mamba-ssm")

TOL = {torch.float32: (5e-3, 1e-2), torch.bfloat16: (3e-2, 6e-2)}
NAMES = ("x", "dt", "A", "B", "C", "initial_state")


def _inputs(T: int = 300, Bt: int = 2, H: int = 8, P: int = 64, G: int = 2, N: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    reset = torch.rand(Bt, T, generator=g) < 0.01
    reset[0, 0] = True
    reset[1, 100:102] = True  # consecutive resets, one inside a chunk
    return {
        "x": torch.randn(Bt, T, H, P, generator=g, dtype=torch.float64),
        "dt": torch.rand(Bt, T, H, generator=g, dtype=torch.float64) * 0.1 + 1e-3,
        "A": -torch.exp(torch.rand(H, generator=g, dtype=torch.float64) * 2.7),
        "B": torch.randn(Bt, T, G, N, generator=g, dtype=torch.float64),
        "C": torch.randn(Bt, T, G, N, generator=g, dtype=torch.float64),
        "initial_state": torch.randn(Bt, H, N, P, generator=g, dtype=torch.float64),
        "reset": reset,
    }


def _run(fn, inputs: dict, dtype: torch.dtype, **kw):
    leaves = {}
    for k, v in inputs.items():
        if k in NAMES:
            cast = v.float() if k in ("dt", "A", "initial_state") and dtype != torch.float64 else v.to(dtype)
            leaves[k] = cast.cuda().requires_grad_(True)
        else:
            leaves[k] = v.cuda()
    y, state = fn(**leaves, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64).cuda()).sum() + \
        (state.double() * torch.randn(state.shape, generator=g, dtype=torch.float64).cuda()).sum()
    return y, state, torch.autograd.grad(loss, [leaves[k] for k in NAMES])


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref.detach()).norm() / ref.detach().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adapter_matches_float64_chunked(dtype: torch.dtype) -> None:
    inputs = _inputs()
    ref = _run(ssd_chunked, inputs, torch.float64, chunk_size=64)
    out = _run(ssd_mamba_ssm, inputs, dtype, chunk_size=64)
    tol_out, tol_grad = TOL[dtype]
    assert out[0].dtype == dtype and out[1].shape == ref[1].shape
    assert _rel(out[0], ref[0]) <= tol_out, f"y: {_rel(out[0], ref[0]):.3g}"
    assert _rel(out[1], ref[1]) <= tol_out, f"final state: {_rel(out[1], ref[1]):.3g}"
    for name, a, b in zip(NAMES, out[2], ref[2], strict=True):
        assert _rel(a, b) <= tol_grad, f"gradient of {name}: {_rel(a, b):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_auto_kernel_matches_chunked(dtype: torch.dtype) -> None:
    from mmgrow.layers.mamba2 import Mamba2
    from mmgrow.protocols import PAD_SEGMENT, SeqContext

    torch.manual_seed(0)
    auto = Mamba2(dim=256, d_state=64, ngroups=2).cuda().to(dtype)
    chunked = Mamba2(dim=256, d_state=64, ngroups=2, kernel="chunked").cuda().to(dtype)
    chunked.load_state_dict(auto.state_dict())
    T = 300
    seg = torch.zeros(2, T, dtype=torch.long)
    seg[0, 120:] = 1
    seg[1, 250:] = PAD_SEGMENT
    ctx = SeqContext(positions=torch.zeros(2, T, dtype=torch.long, device="cuda"), segment_ids=seg.cuda())
    x = torch.randn(2, T, 256, device="cuda", dtype=dtype)
    assert auto.kernel_for(x) == "mamba_ssm"
    y_auto, s_auto = auto(x, ctx)
    y_ref, s_ref = chunked(x, ctx)
    tol_out, tol_grad = TOL[dtype]
    assert _rel(y_auto, y_ref.double()) <= tol_out
    assert _rel(s_auto.ssm, s_ref.ssm.double()) <= tol_out
    y_auto.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    for (name, a), b in zip(auto.named_parameters(), chunked.parameters(), strict=True):
        assert _rel(a.grad, b.grad.double()) <= tol_grad, f"gradient of {name}: {_rel(a.grad, b.grad.double()):.3g}"
