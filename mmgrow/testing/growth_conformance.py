"""The growth conformance check: a strategy keeps the promise its ``preserves`` makes.

:func:`check_growth` builds a small model (AR :class:`~mmgrow.models.unified.UnifiedModel`, or a DiT
:class:`~mmgrow.models.backbone.Backbone` with adaLN-Zero or adaLN-single modulation and an ungated
cross-attention branch with biases — non-zero, as after training), applies the strategy built from
its ``conformance_kwargs()``, and checks

- the function: bit-identical (``torch.equal``) when the application reports ``"exact"``, within
  the class's ``tolerance`` (float32; 1e-10 in float64) for ``"tolerance"``;
- the report: no claim stronger than the class declares; reported new parameters exist and hold at
  least every added parameter;
- replay: the strategy rebuilt from ``spec_of`` on a fresh base gives a structure the grown weights
  load into strictly, with the same outputs.

``tests/conformance/test_growth.py`` runs it for every registered strategy x mixer x architecture x
dtype; ``mmgrow plugins check`` runs it with full attention for a growth plugin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

ARCHITECTURES = ("ar", "dit_adaln_zero", "dit_adaln_single")
DIM, DEPTH, BATCH, SEQ = 32, 3, 2, 12
_ORDER = {"exact": 0, "tolerance": 1, "none": 2}


def mixer_factory(cls: type) -> Callable:
    kwargs = cls.conformance_kwargs() if hasattr(cls, "conformance_kwargs") else {}
    return functools.partial(cls, **kwargs)


def build_model(mixer: Callable, arch: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A 3-block model of width 32: AR, or a DiT backbone with non-zero modulation and cross-attention."""
    from mmgrow.models.backbone import Backbone
    from mmgrow.models.unified import UnifiedModel

    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
    torch.manual_seed(seed)
    if arch == "ar":
        model = UnifiedModel(token_space={"text": 40, "video": 24}, dim=DIM, depth=DEPTH, mixer=mixer)
    else:
        model = Backbone(DIM, DEPTH, mixer, cross_attention={"cond_dim": 8, "num_heads": 2},
                         modulation={"kind": arch.removeprefix("dit_"), "cond_dim": 16})
        with torch.no_grad():  # as after training: non-zero modulation, cross-attention output and biases
            for block in model.blocks:
                for p in (*block.modulation.parameters(), *block.cross_attentions.parameters()):
                    p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def run_model(model: nn.Module, arch: str, dtype: torch.dtype, reads: nn.Module) -> torch.Tensor:
    """Outputs on a fixed random input whose context feeds everything ``reads`` (the grown model) reads."""
    from mmgrow.growth.check import probe_context

    gen = torch.Generator().manual_seed(7)
    ctx = probe_context(reads, BATCH, SEQ, causal=arch == "ar", generator=gen, dtype=dtype)
    with torch.no_grad():
        if arch == "ar":
            return model(torch.randint(0, 64, (BATCH, SEQ), generator=gen), ctx).hidden
        return model(torch.randn(BATCH, SEQ, DIM, generator=gen, dtype=dtype), ctx)[0]


def check_growth(cls: type, mixer_cls: type, arch: str = "ar", dtype: torch.dtype = torch.float64) -> None:
    """Raise ``AssertionError`` if the growth strategy ``cls`` breaks its contract on this model."""
    from mmgrow.growth.base import spec_of, strategy_from_spec

    strategy = cls(**(cls.conformance_kwargs() if hasattr(cls, "conformance_kwargs") else {}))
    mixer = mixer_factory(mixer_cls)
    model = build_model(mixer, arch, dtype)
    grown = build_model(mixer, arch, dtype)
    report = strategy.apply(grown)
    before, after = run_model(model, arch, dtype, grown), run_model(grown, arch, dtype, grown)
    assert after.shape == before.shape and bool(torch.isfinite(after).all()), "grown model gives non-finite output"

    assert cls.preserves == "none" or _ORDER[report.preserves] <= _ORDER[cls.preserves], \
        f"this application claims {report.preserves!r}, weaker than the class's {cls.preserves!r}"
    if report.preserves == "exact":
        assert torch.equal(before, after), f"reported exact, but max |dy| = {float((after - before).abs().max()):.3g}"
    elif report.preserves == "tolerance":
        rel = float((after - before).abs().max() / before.abs().max())
        bound = cls.tolerance if dtype == torch.float32 else 1e-10
        assert rel <= bound, f"relative change {rel:.3g} > stated tolerance {bound:g}"

    names = dict(grown.named_parameters())
    assert set(report.new_parameters) <= set(names), "reported new parameters that the model does not have"
    added = sum(p.numel() for p in grown.parameters()) - sum(p.numel() for p in model.parameters())
    reported = sum(names[n].numel() for n in report.new_parameters)
    assert reported >= added, f"{added} parameters were added but the reported new tensors hold only {reported}"

    replayed = build_model(mixer, arch, dtype, seed=1)
    strategy_from_spec(spec_of(strategy)).apply(replayed)
    replayed.load_state_dict(grown.state_dict())
    assert torch.equal(run_model(replayed, arch, dtype, grown), after), "replaying the spec gives another function"
