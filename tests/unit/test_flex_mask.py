"""The FlexAttention ``mask_mod`` (used on CUDA) is the mask rule, checked point by point on CPU."""

from __future__ import annotations

import pytest
import torch

from mmgrow.ops.flex import mask_mod_for
from mmgrow.ops.token_meta import tile_mask
from mmgrow.testing.mask_cases import mask_cases

CASES = mask_cases(T=29, window=4)


@pytest.mark.parametrize("case", CASES)
def test_flex_mask_mod_equals_the_mask_rule_everywhere(case: str) -> None:
    meta, spec = CASES[case]
    B, T = meta.positions.shape
    b = torch.arange(B)[:, None, None]
    qi = torch.arange(T)[None, :, None]
    ki = torch.arange(T)[None, None, :]
    got = mask_mod_for(meta, meta, spec)(b, torch.zeros_like(b), qi, ki)
    want = tile_mask(meta, meta, spec)
    assert got.shape == want.shape and got.dtype == torch.bool
    assert torch.equal(got, want)
    assert bool(want.any())  # some pair is visible in every case
