"""Optional GPU kernel for the gated delta rule: flash-linear-attention's ``chunk_gated_delta_rule``.

FLA (``pip install flash-linear-attention``, MIT, Triton) is imported lazily inside the functions
below, never at module import, so mmgrow runs without it. :func:`gated_delta_fla` has the signature
and results of :func:`mmgrow.ops.gated_delta.gated_delta_chunked` and converts at the boundary.

What FLA's ``chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
use_qk_l2norm_in_kernel, cu_seqlens)`` documents, and what the adapter does with it:

* tensors are ``[B, T, H, D]`` and ``g`` is the log-decay: the same layout and argument order as
  ours (g before beta in this function, unlike FLA's naive recurrent reference);
* ``initial_state`` / the final state are ``[N, H, K, V]`` (key side first, our layout), one per
  sequence; the adapter always asks for the final state (``output_final_state=True``) and keeps it
  in float32, as FLA returns it; ``fla >= 0.5.1`` also has ``state_v_first`` (default False), which
  the adapter leaves alone;
* ``use_qk_l2norm_in_kernel`` would L2-normalise q and k inside the kernel; the adapter passes False
  because our op takes q and k as given (the layer normalises them itself);
* ``cu_seqlens`` (``[N + 1]`` int64 offsets, batch must be 1) runs several sequences packed in one
  row, each from its own initial state;
* the chunk size is fixed inside FLA (64): our ``chunk_size`` argument is accepted and ignored
  (it changes nothing but rounding);
* ``g = -inf`` is not usable for resets (the kernel takes differences of in-chunk cumulative sums:
  ``-inf - (-inf)`` is NaN), so resets are honoured structurally (:func:`fla_honours_resets`):
  a reset at ``t = 0`` zeroes that row's initial state; resets inside a row are only possible with
  batch 1, as ``cu_seqlens`` boundaries. Anything else raises, and the layer falls back to our
  chunked op.

Inputs go in as given for q, k, v, beta (FLA wants q, k, v of one dtype; half precision is its
main target: some FLA versions reject float32) and float32 for g and the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _chunk_kernel() -> Callable[..., Any] | None:
    """FLA's ``chunk_gated_delta_rule``, or None when FLA (or Triton under it) cannot be imported."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001 - a missing or broken FLA/Triton install must only disable the kernel
        return None
    return chunk_gated_delta_rule


def fla_available(device: torch.device | str) -> bool:
    """True on a CUDA device when ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` imports."""
    return torch.device(device).type == "cuda" and _chunk_kernel() is not None


def fla_honours_resets(reset: Tensor | None) -> bool:
    """Whether :func:`gated_delta_fla` can honour ``reset [B, T]``: no resets, resets only at
    ``t = 0`` (zeroed initial states), or batch 1 (``cu_seqlens``). Reads the tensor (a host sync)."""
    if reset is None or reset.shape[1] <= 1 or reset.shape[0] == 1:
        return True
    return not bool(reset[:, 1:].any())


def gated_delta_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None,
                    chunk_size: int = 64, initial_state: Tensor | None = None,
                    reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`~mmgrow.ops.gated_delta.gated_delta_chunked` computed by FLA's Triton kernel.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g, beta: ``[B, T, H]``.
        scale: query scale (None: ``K ** -0.5``); chunk_size: ignored (FLA uses 64).
        initial_state: ``[B, H, K, V]`` or None; reset: ``[B, T]`` bool or None (see
            :func:`fla_honours_resets`).

    Returns:
        ``o [B, T, H, V]`` (dtype of ``q``) and the final state ``[B, H, K, V]`` (float32).
    """
    kernel = _chunk_kernel()
    if kernel is None:
        raise RuntimeError("gated_delta_fla: flash-linear-attention is not importable "
                           "(pip install flash-linear-attention); use gated_delta_chunked")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    h0 = (initial_state.float() if initial_state is not None
          else torch.zeros(B, H, K, V, device=q.device, dtype=torch.float32))
    if h0.shape != (B, H, K, V):
        raise ValueError(f"gated_delta_fla: initial_state must be [B, H, K, V] = {[B, H, K, V]}, got "
                         f"{tuple(h0.shape)}")
    if T == 0:
        return q.new_zeros(B, 0, H, V), h0.clone()
    if not fla_honours_resets(reset):
        raise ValueError("gated_delta_fla: resets inside a row need batch size 1 (FLA's cu_seqlens); "
                         f"got batch {B}. Use gated_delta_chunked")
    if reset is not None:  # a reset at t = 0: the row starts from zeros
        h0 = torch.where(reset[:, :1, None, None], torch.zeros_like(h0), h0)
    v = v.to(q.dtype)
    k = k.to(q.dtype)
    g = g.float()
    beta = beta.to(q.dtype)
    common = {"scale": scale, "output_final_state": True, "use_qk_l2norm_in_kernel": False}
    inner = reset[:, 1:] if reset is not None else None
    if inner is None or not bool(inner.any()):
        o, final = kernel(q, k, v, g, beta, initial_state=h0, **common)
        return o.to(q.dtype), final.float()
    # Batch 1 with resets inside the row: one varlen sequence per segment; the first continues h0.
    starts = torch.nonzero(inner[0]).flatten() + 1
    cu_seqlens = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), T)]).to(torch.long)
    h0_all = torch.cat([h0, h0.new_zeros(starts.numel(), H, K, V)], dim=0)  # [N, H, K, V]
    o, final = kernel(q, k, v, g, beta, initial_state=h0_all, cu_seqlens=cu_seqlens, **common)
    return o.to(q.dtype), final[-1:].float()
