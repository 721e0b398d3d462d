"""Fixtures shared by the unit tests."""

from __future__ import annotations

import itertools
import sys
import types

import pytest
import torch

from mmgrow.ops.gated_delta import gated_delta_chunked


@pytest.fixture
def fake_fla(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Put ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` into ``sys.modules``: FLA's documented
    signature ([B, T, H, D] tensors, log-space g before beta, [N, H, K, V] states, cu_seqlens with
    batch 1), computed by our chunked op one sequence at a time. Returns the list of its calls."""
    calls: list[dict] = []

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None):
        calls.append({"cu_seqlens": cu_seqlens, "g_dtype": g.dtype, "l2norm": use_qk_l2norm_in_kernel,
                      "initial_state": initial_state})
        assert q.shape == k.shape and v.shape[:3] == q.shape[:3] and g.shape == beta.shape == q.shape[:3]
        assert bool(torch.isfinite(g).all()), "FLA cannot take g = -inf"
        B, T, H, K = q.shape
        bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
        assert cu_seqlens is None or B == 1, "cu_seqlens needs batch 1"
        N = B if cu_seqlens is None else len(bounds) - 1
        assert initial_state is None or initial_state.shape == (N, H, K, v.shape[-1])
        outs, finals = [], []
        for n, (start, end) in enumerate(itertools.pairwise(bounds)):
            h0 = None if initial_state is None else (initial_state if cu_seqlens is None else initial_state[n:n + 1])
            o, final = gated_delta_chunked(q[:, start:end], k[:, start:end], v[:, start:end], g[:, start:end],
                                           beta[:, start:end], scale=scale, chunk_size=64, initial_state=h0)
            outs.append(o)
            finals.append(final)
        return torch.cat(outs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)

    package, ops, gdr = (types.ModuleType(n) for n in ("fla", "fla.ops", "fla.ops.gated_delta_rule"))
    gdr.chunk_gated_delta_rule = chunk_gated_delta_rule
    package.ops, ops.gated_delta_rule = ops, gdr
    for module in (package, ops, gdr):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls
