"""CUDA checks of the attention kernels against the float64 CPU oracle (run on a GPU machine).

This folder is outside the CPU suite's ``testpaths`` (CI has no GPU); run it on a GPU machine with
``PYTHONPATH=. python -m pytest -p no:logging gpu_tests``; ``docs/attention.md`` records the device
and the result. Without CUDA the module skips itself. Tolerances: float32 within 1e-4
relative (TF32 may be on for matmuls), bf16 by the flash-attn rule — the error against float64 at
most 2x (outputs) and 3x (gradients) that of naive attention computed in bf16.
"""

from __future__ import annotations

import pytest
import torch

from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.blockwise import blockwise_attention
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.testing.mask_cases import mask_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = mask_cases(T=300, window=40)


def _to(meta: TokenMeta, device: str) -> TokenMeta:
    return TokenMeta(*(None if t is None else t.to(device) for t in meta.tensors()))


def _inputs(dtype: torch.dtype, T: int = 300, H: int = 4, Hk: int = 2, hd: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cpu = [torch.randn(2, h, T, hd, generator=g, dtype=torch.float64) for h in (H, Hk, Hk)]
    return cpu, [t.to("cuda", dtype).requires_grad_() for t in cpu]


def _oracle(cpu, meta, spec, grad_out):
    inp = [t.clone().requires_grad_() for t in cpu]
    out, lse = dense_attention(*inp, tile_mask(meta, meta, spec))
    grads = torch.autograd.grad((out * grad_out).sum(), inp)
    return out, lse, grads


def _naive_low_precision(gpu, meta, spec, grad_out):
    inp = [t.detach().clone().requires_grad_() for t in gpu]
    out, _ = dense_attention(*inp, tile_mask(_to(meta, "cuda"), _to(meta, "cuda"), spec))
    grads = torch.autograd.grad((out.double() * grad_out.cuda()).sum(), inp)
    return out, grads


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach()).abs().max())


def _floor(b: torch.Tensor) -> float:
    """An absolute floor for quantities that are exactly 0 in exact arithmetic (e.g. dQ when every
    query sees only itself): rounding-level errors there have nothing to be relative to."""
    return 1e-5 * max(1.0, float(b.detach().abs().max()))


def _check(run, case: str, dtype: torch.dtype) -> None:
    meta, spec = CASES[case]
    cpu, gpu = _inputs(dtype)
    grad_out = torch.randn(2, 4, 300, 64, dtype=torch.float64)
    ref_out, ref_lse, ref_grads = _oracle(cpu, meta, spec, grad_out)
    out, lse = run(gpu, _to(meta, "cuda"), spec)
    grads = torch.autograd.grad((out.double() * grad_out.cuda()).sum(), gpu)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), ~finite), "empty rows differ"
    assert not bool(torch.isnan(out).any())
    if dtype == torch.float32:
        assert _err(out, ref_out) <= 1e-4 * float(ref_out.detach().abs().max())
        assert _err(lse.cpu()[finite], ref_lse[finite]) <= 1e-4 * float(ref_lse[finite].detach().abs().max())
        for a, b in zip(grads, ref_grads):
            assert _err(a, b) <= 1e-4 * float(b.abs().max()) + _floor(b)
    else:
        naive_out, naive_grads = _naive_low_precision(gpu, meta, spec, grad_out)
        assert _err(out, ref_out) <= 2 * _err(naive_out, ref_out) + _floor(ref_out)
        for a, b, c in zip(grads, naive_grads, ref_grads):
            assert _err(a, c) <= 3 * _err(b, c) + _floor(c)


def _flex(gpu, meta, spec):
    from mmgrow.ops.flex import flex_masked_attention

    return flex_masked_attention(*gpu, meta, meta, spec)


def _blockwise(gpu, meta, spec):
    return blockwise_attention(*gpu, meta, meta, spec, q_block=64, k_block=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_flex_attention_matches_oracle(case: str, dtype: torch.dtype) -> None:
    _check(_flex, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_blockwise_on_cuda_matches_oracle(case: str, dtype: torch.dtype) -> None:
    _check(_blockwise, case, dtype)


@pytest.mark.parametrize("case", ["causal window", "symmetric window", "segments + window",
                                  "blocks + segments + window"])
def test_sliding_window_on_cuda_matches_oracle(case: str) -> None:
    from mmgrow.ops.sliding_window import sliding_window_attention

    _check(lambda gpu, meta, spec: sliding_window_attention(*gpu, meta, spec), case, torch.bfloat16)


@pytest.mark.parametrize("case", ["segments + padding", "blocks + segments + window", "local blocks + shared prefix"])
def test_full_attention_on_cuda_picks_flex_and_equals_sdpa_path(case: str) -> None:
    """The `full` mixer on CUDA (FlexAttention chosen for masks) equals its SDPA path on the same GPU."""
    from mmgrow.layers.attention import FullAttention
    from mmgrow.protocols import SeqContext

    meta, spec = CASES[case]
    meta = _to(meta, "cuda")
    ctx = SeqContext(positions=meta.positions, segment_ids=meta.segment_ids, block_ids=meta.block_ids, mask=spec)
    torch.manual_seed(0)
    auto = FullAttention(dim=128, num_heads=4, num_kv_heads=2).cuda()
    sdpa = FullAttention(dim=128, num_heads=4, num_kv_heads=2, kernel="sdpa").cuda()
    sdpa.load_state_dict(auto.state_dict())
    assert auto.kernel_for(ctx, torch.empty(1, device="cuda"), 0.0) == "flex"
    x = torch.randn(2, 300, 128, device="cuda")
    y_auto, _ = auto(x, ctx)
    y_sdpa, _ = sdpa(x, ctx)
    assert float((y_auto - y_sdpa).abs().max()) <= 1e-4 * float(y_sdpa.detach().abs().max())
    (y_auto.square().sum()).backward()
    (y_sdpa.square().sum()).backward()
    for a, b in zip(auto.parameters(), sdpa.parameters()):
        assert float((a.grad - b.grad).abs().max()) <= 1e-3 * float(b.grad.abs().max())


@pytest.mark.parametrize("mixer", ["blockwise:BlockwiseAttention", "sliding_window:SlidingWindowAttention",
                                   "local:LocalAttention", "ring:RingAttention"])
def test_attention_mixers_on_cuda_auto_kernel_equals_their_native_algorithm(mixer: str) -> None:
    """On CUDA, `auto` sends the attention subclasses to the fused kernels; the result equals their
    own (tiles / chunks) algorithm on the same GPU, forward and parameter gradients, in float32."""
    import importlib

    from mmgrow.protocols import SeqContext

    meta, spec = CASES["blocks + segments + window"]
    meta = _to(meta, "cuda")
    ctx = SeqContext(positions=meta.positions, segment_ids=meta.segment_ids, block_ids=meta.block_ids, mask=spec)
    module, name = mixer.split(":")  # classes, not registry names: the GPU machine may not install mmgrow
    cls = getattr(importlib.import_module(f"mmgrow.layers.{module}"), name)
    kw = {"dim": 128, "num_heads": 4, "num_kv_heads": 2}
    torch.manual_seed(0)
    auto = cls(**kw).cuda()
    native = cls(**kw, kernel="native").cuda()
    native.load_state_dict(auto.state_dict())
    assert auto.kernel_for(auto.layer_context(ctx), torch.empty(1, device="cuda"), 0.0) == "flex"
    x = torch.randn(2, 300, 128, device="cuda")
    y_auto, _ = auto(x, ctx)
    y_native, _ = native(x, ctx)
    assert float((y_auto - y_native).abs().max()) <= 1e-4 * float(y_native.detach().abs().max())
    y_auto.square().sum().backward()
    y_native.square().sum().backward()
    for a, b in zip(auto.parameters(), native.parameters()):
        assert float((a.grad - b.grad).abs().max()) <= 1e-3 * float(b.grad.abs().max())
