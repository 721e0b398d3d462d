"""CUDA checks of the fused ring hop (:mod:`mmgrow.ops.ring_hop`) against the float64 CPU oracle.

Not run yet: written without a GPU. Run on a GPU machine with
``PYTHONPATH=. python -m pytest -p no:logging gpu_tests/test_cuda_ring_hop.py``. It checks that the
CUDA branch (``_scaled_dot_product_efficient_attention`` forward/backward with the final LSE) really
runs (``fused_calls > 0``) and that the one-process ring (``ring_attention(cp=None)``: one hop, fused
pieces of zigzag-like runs) matches dense float64 attention: float32 within 1e-4 relative, bfloat16
within 3e-2 relative. Without CUDA the module skips itself.
"""

from __future__ import annotations

import pytest
import torch

from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.blockwise import TilePlan, backward_tiles, forward_tiles
from mmgrow.ops.ring import RingStats, ring_attention
from mmgrow.ops.ring_hop import fused_pieces, hop_backward, hop_forward
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.protocols import MaskSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    fin = torch.isfinite(want)
    return float((got - want)[fin].abs().max() / want[fin].abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec, heads", [(MaskSpec(), (4, 4)), (MaskSpec(), (8, 2)), (MaskSpec(causal=False), (4, 2))])
def test_one_process_ring_on_cuda_matches_the_oracle(dtype, spec, heads) -> None:
    H, Hk = heads
    T = 320  # two runs of 160 (a zigzag-like shard: chunks 0 and 3 of 4)
    index = torch.cat([torch.arange(0, 160), torch.arange(480, 640)])[None].expand(2, T)
    meta = TokenMeta(index, index)
    g = torch.Generator().manual_seed(0)
    cpu = [torch.randn(2, h, T, 64, generator=g, dtype=torch.float64) for h in (H, Hk, Hk)]
    grad = torch.randn(2, H, T, 64, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in cpu]
    w_out, w_lse = dense_attention(*ref, tile_mask(meta, meta, spec))
    want = [w_out, w_lse, *torch.autograd.grad((w_out * grad).sum(), ref)]
    dev = [t.to("cuda", dtype).requires_grad_() for t in cpu]
    cmeta = TokenMeta(index.cuda(), index.cuda())
    stats = RingStats()
    out, lse = ring_attention(*dev, cmeta, spec, None, q_block=64, k_block=64, stats=stats)
    got = [out, lse, *torch.autograd.grad((out * grad.to("cuda", dtype)).sum(), dev)]
    assert stats.fused_calls > 0
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert _rel(a, b) < TOL[dtype], (name, _rel(a, b))


def test_fused_hop_equals_the_tile_kernels_on_cuda() -> None:
    """float32: the CUDA fused hop against the CUDA tile kernels on a full off-diagonal hop, with the
    final LSE of a larger key set (backward) and an arbitrary delta (the ``out'`` path)."""
    q_idx = torch.arange(600, 700)[None].expand(2, 100).cuda()
    k_idx = torch.arange(0, 96)[None].expand(2, 96).cuda()
    plan = TilePlan(TokenMeta(q_idx, q_idx), TokenMeta(k_idx, k_idx), MaskSpec(), 32, 32)
    q = torch.randn(2, 8, 100, 64, device="cuda")
    k, v = torch.randn(2, 2, 96, 64, device="cuda"), torch.randn(2, 2, 96, 64, device="cuda")
    assert [p.kind for p in fused_pieces(q, plan, True)] == ["full"]
    o1, l1 = forward_tiles(q, k, v, plan, 0.125)
    o2, l2 = hop_forward(q, k, v, plan, 0.125, fused=True)
    assert _rel(o2, o1) < 1e-4 and _rel(l2, l1) < 1e-5
    dout = torch.randn_like(o1)
    lse, delta = l1 + 0.5, torch.randn_like(l1)
    for g_fused, g_tiles in zip(hop_backward(q, k, v, dout, lse, delta, plan, 0.125, fused=True),
                                backward_tiles(q, k, v, dout, lse, delta, plan, 0.125), strict=True):
        assert _rel(g_fused, g_tiles) < 1e-4
