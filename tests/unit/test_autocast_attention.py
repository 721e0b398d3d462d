"""``trainer.precision: bf16-mixed`` reaches the attention kernels as bf16 ``q, k, v`` inside
``torch.autocast``: the blockwise and ring kernels must run there (forward, and backward both outside
autocast as Lightning runs it and inside) and keep the flash-attention rule their float32 running max,
normaliser and numerator are for: error against float64 at most 2x (output) / 3x (gradients) that of
naive bf16 attention, over rows of 16 key tiles. Measured: output 1.28x, gradients 0.57-0.92x (backward
outside autocast) and 0.88-1.11x (inside, where autocast also runs the backward's matmuls in bf16).
The ring at cp = 2 under autocast: tests/distributed/test_throughput_options.py."""

from __future__ import annotations

import pytest
import torch

from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.blockwise import blockwise_attention
from mmgrow.ops.ring import ring_attention
from mmgrow.ops.token_meta import tile_mask
from mmgrow.testing.mask_cases import mask_cases

T = 64
CASES = mask_cases(T=T, window=9)
KERNELS = {
    "blockwise": lambda q, k, v, meta, spec: blockwise_attention(q, k, v, meta, meta, spec, q_block=8, k_block=4),
    "ring (one process)": lambda q, k, v, meta, spec: ring_attention(q, k, v, meta, spec, None, q_block=8, k_block=4),
}


@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["backward outside (Lightning)", "inside"])
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", ["causal", "segments + padding"])
def test_attention_kernels_under_bf16_autocast_follow_the_flash_attn_rule(kernel, case, backward_in_autocast):
    meta, spec = CASES[case]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, T, 16, generator=g).to(torch.bfloat16).requires_grad_() for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = KERNELS[kernel](q, k, v, meta, spec)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    naive_in = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    naive, _ = dense_attention(*naive_in, tile_mask(meta, meta, spec))
    exact_in = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = dense_attention(*exact_in, tile_mask(meta, meta, spec))
    err, naive_err = (out.double() - ref).abs().max(), (naive.double() - ref).abs().max()
    print(f"{kernel}, {case}: out error / naive bf16 error = {float(err / naive_err):.2f}")
    assert naive_err > 0 and err <= 2 * naive_err, (float(err), float(naive_err))
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_in_autocast):
        mine = torch.autograd.grad((out.double() * grad).sum(), (q, k, v))
    low = torch.autograd.grad((naive.double() * grad).sum(), naive_in)
    exact = torch.autograd.grad((ref * grad).sum(), exact_in)
    for name, a, b, c in zip("qkv", mine, low, exact):
        assert a.dtype == torch.bfloat16, name
        ratio = (a.double() - c).abs().max() / (b.double() - c).abs().max()
        print(f"  d{name} error / naive = {float(ratio):.2f}")
        assert ratio <= 3, name
