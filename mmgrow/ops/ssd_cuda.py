"""Optional adapter to mamba-ssm's fused Triton SSD kernel (``mamba_chunk_scan_combined``).

mmgrow never needs it: :func:`mmgrow.ops.ssd.ssd_chunked` is the portable path. On a CUDA device with
``mamba-ssm`` installed, :class:`~mmgrow.layers.mamba2.Mamba2` (``kernel="auto"`` or ``"mamba_ssm"``)
calls :func:`ssd_mamba_ssm` instead. The package is imported lazily, inside the functions, so
mmgrow imports and runs without it (and without Triton).

**Layouts at the boundary.** mamba-ssm takes ``x [b, l, h, p]``, ``dt [b, l, h]``, ``A [h]``,
``B, C [b, l, g, n]`` (ours too) but keeps the state value-first, ``[b, h, p, n]``; mmgrow's
state is key-first, ``[b, h, n, p]``, so initial and final states are transposed here.

**Resets.** mamba-ssm expresses packed rows with ``seq_idx [b, l]`` (int32): the state is cut
wherever ``seq_idx`` changes, and the ``initial_states`` belong to ``seq_idx == 0``. A reset mask
maps onto that exactly as ``seq_idx = cumsum(reset)`` (a fresh, increasing id after every reset,
so the ids never repeat; a reset at ``t = 0`` gives id 1 and drops the initial state, as ours
does). So the adapter honours every reset pattern, resets inside a row included, and the layer
dispatches to it whatever the segment layout. We pass ``dt`` already softplus'd and limited
(``dt_bias=None``, ``dt_softplus=False``) and no ``D``/``z``: the layer adds them itself.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor

from mmgrow.ops.ssd import check_ssd_inputs

KERNEL_MODULE = "mamba_ssm.ops.triton.ssd_combined"


def _cuda_device(device: torch.device | str) -> bool:
    """True when ``device`` is a usable CUDA device (tests replace this to exercise the dispatch on CPU)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _kernel() -> Any:
    """``mamba_chunk_scan_combined``, or None when mamba-ssm (or its Triton) does not import."""
    try:
        return importlib.import_module(KERNEL_MODULE).mamba_chunk_scan_combined
    except Exception:  # noqa: BLE001 - a broken install (ImportError, Triton/CUDA errors) means "not available"
        return None


def mamba_ssm_available(device: torch.device | str) -> bool:
    """True when ``device`` is CUDA and mamba-ssm's ``mamba_chunk_scan_combined`` imports."""
    return _cuda_device(device) and _kernel() is not None


def reset_to_seq_idx(reset: Tensor) -> Tensor:
    """``reset [b, l]`` bool -> mamba-ssm's ``seq_idx [b, l]`` int32 (a new id after every reset)."""
    return torch.cumsum(reset.to(torch.int32), dim=1, dtype=torch.int32)


def ssd_mamba_ssm(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int,
                  initial_state: Tensor | None = None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`mmgrow.ops.ssd.ssd_chunked` on mamba-ssm's kernel: same arguments, shapes and results.

    ``x [Bt, T, H, P]``, ``dt [Bt, T, H]``, ``A [H]``, ``B, C [Bt, T, G, N]``, ``initial_state
    [Bt, H, N, P]`` or None, ``reset [Bt, T]`` bool or None -> ``(y [Bt, T, H, P], final_state
    [Bt, H, N, P])``. Needs ``T >= 1``; the final state comes back in the initial state's dtype
    (``x``'s when none is given).
    """
    T = check_ssd_inputs(x, dt, A, B, C, initial_state, reset)[1]
    if T == 0:
        raise ValueError("ssd_mamba_ssm: needs at least one token (T >= 1)")
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError(f"ssd_mamba_ssm: {KERNEL_MODULE}.mamba_chunk_scan_combined does not import; "
                           "install mamba-ssm (with Triton) or use ssd_chunked")
    state_dtype = initial_state.dtype if initial_state is not None else x.dtype
    init = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()  # [b, h, p, n]
    seq_idx = None if reset is None else reset_to_seq_idx(reset).contiguous()
    # One dtype for x, B and C: the kernel multiplies them in Triton dot products.
    y, final = kernel(x.contiguous(), dt.float().contiguous(), A.float().contiguous(), B.to(x.dtype).contiguous(),
                      C.to(x.dtype).contiguous(), chunk_size, D=None, z=None, dt_bias=None, initial_states=init,
                      seq_idx=seq_idx, dt_softplus=False, return_final_states=True)
    return y.to(x.dtype), final.transpose(-1, -2).to(state_dtype)
