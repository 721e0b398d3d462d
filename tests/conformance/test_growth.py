"""Every registered growth strategy x every registered mixer kind x {AR, DiT adaLN-Zero, DiT
adaLN-single}, in float32 and float64: the function is kept as the strategy declares, the reported
new parameters are real, and replaying the strategy on a fresh base rebuilds the grown structure.

The DiT backbones carry an *ungated* cross-attention branch with biases on ``ctx.condition`` and
random (non-zero) modulation, so a strategy that only zeroed gates would fail here. Mixers that can
only run causally (``causal_only``) are paired with the AR model only — a DiT is bidirectional.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import mmgrow
from mmgrow.growth.base import spec_of, strategy_from_spec
from mmgrow.growth.check import probe_context
from mmgrow.models.backbone import Backbone
from mmgrow.models.unified import UnifiedModel

DIM, DEPTH, B, T = 32, 3, 2, 12
ARCHES = ("ar", "dit_adaln_zero", "dit_adaln_single")


def _mixer_classes() -> list[tuple[str, type]]:
    out = []
    for kind in ("mixers", "memory"):
        for name in mmgrow.available(kind):
            out.append((f"{kind}:{name}", mmgrow.load_plugin(kind, name)))
    return out


def _cases() -> list:
    cases = []
    for gname in mmgrow.available("growth"):
        for mname, mcls in _mixer_classes():
            for arch in ARCHES:
                if arch != "ar" and mcls.causal_only:
                    continue
                for dtype in (torch.float32, torch.float64):
                    cases.append(pytest.param(gname, mname, arch, dtype,
                                              id=f"{gname}-{mname}-{arch}-{str(dtype)[6:]}"))
    return cases


def _factory(mixer_name: str):
    kind, name = mixer_name.split(":")
    cls = mmgrow.load_plugin(kind, name)
    kwargs = cls.conformance_kwargs() if hasattr(cls, "conformance_kwargs") else {}
    return functools.partial(cls, **kwargs)


def _build(mixer_name: str, arch: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "ar":
        model = UnifiedModel(token_space={"text": 40, "video": 24}, dim=DIM, depth=DEPTH, mixer=_factory(mixer_name))
    else:
        kind = arch.removeprefix("dit_")
        model = Backbone(DIM, DEPTH, _factory(mixer_name), cross_attention={"cond_dim": 8, "num_heads": 2},
                         modulation={"kind": kind, "cond_dim": 16})
        with torch.no_grad():  # a trained DiT: non-zero modulation, cross-attention output and biases
            for block in model.blocks:
                for p in (*block.modulation.parameters(), *block.cross_attentions.parameters()):
                    p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def _run(model: nn.Module, arch: str, dtype: torch.dtype, ctx_model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    ctx = probe_context(ctx_model, B, T, causal=arch == "ar", generator=gen, dtype=dtype)
    if arch == "ar":
        ids = torch.randint(0, 64, (B, T), generator=gen)
        return model(ids, ctx).hidden
    x = torch.randn(B, T, DIM, generator=gen, dtype=dtype)
    return model(x, ctx)[0]


@pytest.mark.parametrize(("growth_name", "mixer_name", "arch", "dtype"), _cases())
def test_growth_keeps_its_promise(growth_name: str, mixer_name: str, arch: str, dtype: torch.dtype) -> None:
    cls = mmgrow.load_plugin("growth", growth_name)
    strategy = cls(**(cls.conformance_kwargs() if hasattr(cls, "conformance_kwargs") else {}))
    model = _build(mixer_name, arch, dtype)
    grown = _build(mixer_name, arch, dtype)
    report = strategy.apply(grown)
    with torch.no_grad():
        before = _run(model, arch, dtype, grown)
        after = _run(grown, arch, dtype, grown)
    assert after.shape == before.shape and bool(torch.isfinite(after).all())

    order = {"exact": 0, "tolerance": 1, "none": 2}
    assert order[report.preserves] <= order[cls.preserves] or cls.preserves == "none", \
        f"{growth_name}: this application claims {report.preserves!r}, weaker than the class's {cls.preserves!r}"
    if report.preserves == "exact":
        assert torch.equal(before, after), f"max |dy| = {float((after - before).abs().max()):.3g}"
    elif report.preserves == "tolerance":
        rel = float((after - before).abs().max() / before.abs().max())
        bound = cls.tolerance if dtype == torch.float32 else 1e-10
        assert rel <= bound, f"relative change {rel:.3g} > stated tolerance {bound:g}"

    names = dict(grown.named_parameters())
    assert set(report.new_parameters) <= set(names), "reported new parameters that the model does not have"
    added = sum(p.numel() for p in grown.parameters()) - sum(p.numel() for p in model.parameters())
    reported = sum(names[n].numel() for n in report.new_parameters)
    assert reported >= added, f"{added} parameters were added but the reported new tensors hold only {reported}"

    # Replay: the same strategy from its spec on a fresh base gives the same structure (strict load).
    replayed = _build(mixer_name, arch, dtype, seed=1)
    strategy_from_spec(spec_of(strategy)).apply(replayed)
    replayed.load_state_dict(grown.state_dict())
    with torch.no_grad():
        assert torch.equal(_run(replayed, arch, dtype, grown), after)
