"""Every registered growth strategy x every registered mixer kind x {AR, DiT adaLN-Zero, DiT
adaLN-single}, in float32 and float64, against :func:`mmgrow.testing.growth_conformance.check_growth`.

Mixers that can only run causally (``causal_only``) are paired with the AR model only — a DiT is
bidirectional.
"""

from __future__ import annotations

import pytest
import torch

import mmgrow
from mmgrow.testing.growth_conformance import ARCHITECTURES, check_growth


def _cases() -> list:
    mixers = [(kind, name) for kind in ("mixers", "memory") for name in mmgrow.available(kind)]
    cases = []
    for growth in mmgrow.available("growth"):
        for kind, name in mixers:
            causal_only = mmgrow.load_plugin(kind, name).causal_only
            for arch in ARCHITECTURES:
                if arch != "ar" and causal_only:
                    continue
                for dtype in (torch.float32, torch.float64):
                    cases.append(pytest.param(growth, kind, name, arch, dtype,
                                              id=f"{growth}-{kind}:{name}-{arch}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize(("growth", "kind", "name", "arch", "dtype"), _cases())
def test_growth_keeps_its_promise(growth: str, kind: str, name: str, arch: str, dtype: torch.dtype) -> None:
    check_growth(mmgrow.load_plugin("growth", growth), mmgrow.load_plugin(kind, name), arch, dtype)
