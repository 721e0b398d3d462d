"""The plugin conformance suite, as library code.

``tests/conformance`` parametrises it over the registry (so every registered plugin, built-in or
pip-installed, is tested by being registered) and ``mmgrow plugins check NAME`` runs it on one
installed plugin. Capabilities decide which checks apply; there are no name-based skip lists.

Mixers and memory layers (:func:`mixer_checks`) are built small, ``cls(dim=32, layer_idx=0,
**cls.conformance_kwargs())`` (the classmethod is optional), in float64 and eval mode, and checked:

1. ``shapes_and_dtype``: ``y`` has the shape, dtype and device of ``x`` (float32 and float64);
2. ``no_future_leakage``: with a causal context, perturbing ``x[:, t0:]`` leaves ``y[:, :t0]``
   unchanged to 1e-12 (also with blocks starting at ``t0``, a window, packed rows when supported);
3. ``packed_equals_separate`` (``supports_segments``): a packed row equals each segment run alone;
4. ``state_split_equals_one_pass`` and ``decode_equals_prefill`` (``supports_state``);
5. ``gradients_finite_nonzero``: gradients w.r.t. ``x`` and every parameter are finite and nonzero
   (finite also with padding tokens, whose attention rows are empty);
6. ``gradcheck``: ``torch.autograd.gradcheck`` w.r.t. ``x`` on a tiny row;
7. ``reference_equals_fast`` (when the class defines ``reference_forward``, its per-token oracle):
   outputs, every tensor of the returned state and the gradients w.r.t. ``x`` and every parameter
   equal the reference's to 1e-10, fresh and continuing a carried state, plain and packed rows;
8. ``gate_extremes`` (when the class defines ``conformance_extremes``): at each named extreme
   outputs and gradients are finite and still equal the reference;
9. ``unsupported_features_raise``: each context feature the class does not claim raises
   :class:`~mmgrow.protocols.MixerCapabilityError`.

Each check is a no-argument callable raising ``AssertionError`` with a message naming what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmgrow.protocols import (
    NO_BLOCK,
    PAD_SEGMENT,
    ContextParallel,
    MaskSpec,
    MixerCapabilityError,
    SeqContext,
    SequenceMixer,
)

Check = tuple[str, Callable[[], None]]

DIM = 32
EXACT_TOL = 1e-12  # float64: masked-out tokens must not move the output at all
EQUIV_TOL = 1e-10  # float64: same maths, different summation order (chunks, packing)


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    message: str = ""


# --------------------------------------------------------------------------------------------------
# Small helpers: building the mixer, inputs and contexts
# --------------------------------------------------------------------------------------------------


def build_small(cls: type, dtype: torch.dtype = torch.float64, seed: int = 0) -> SequenceMixer:
    """``cls(dim=32, layer_idx=0, **cls.conformance_kwargs())`` in ``dtype``, eval mode, seeded
    without touching the caller's global RNG."""
    kwargs: dict[str, Any] = cls.conformance_kwargs() if hasattr(cls, "conformance_kwargs") else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mixer = cls(dim=DIM, layer_idx=0, **kwargs)
    return mixer.to(dtype).eval()


def _randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def packed_context(rows: list[list[int]], T: int, *, causal: bool = True, window: int | None = None,
                    blocks: bool = False) -> SeqContext:
    """Rows packed from segments of the given lengths, padded with ``PAD_SEGMENT`` to ``T``.

    With ``blocks`` each segment is ``[one loose token, blocks of 3 ...]`` (a text token, then frames).
    """
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    seg = torch.full((len(rows), T), PAD_SEGMENT, dtype=torch.long)
    blk = torch.full((len(rows), T), NO_BLOCK, dtype=torch.long)
    for b, lengths in enumerate(rows):
        if sum(lengths) > T:
            raise ValueError(f"segments {lengths} do not fit in {T} tokens")
        start = 0
        for s, length in enumerate(lengths):
            pos[b, start:start + length] = torch.arange(length)
            seg[b, start:start + length] = s
            blk[b, start:start + length] = _local_blocks(length, offset=100 * s)
            start += length
    return SeqContext(positions=pos, segment_ids=seg, block_ids=blk if blocks else None,
                      mask=MaskSpec(causal=causal, window=window))


def _local_blocks(length: int, offset: int = 0) -> Tensor:
    """Block ids of one example: token 0 loose, then blocks of 3 tokens."""
    ids = torch.full((length,), NO_BLOCK, dtype=torch.long)
    ids[1:] = offset + torch.arange(length - 1) // 3
    return ids


def _single_context(length: int, *, causal: bool, window: int | None, blocks: bool) -> SeqContext:
    return SeqContext(positions=torch.arange(length)[None], block_ids=_local_blocks(length)[None] if blocks else None,
                      mask=MaskSpec(causal=causal, window=window))


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _output(mixer: SequenceMixer, x: Tensor, ctx: SeqContext, state: Any = None) -> tuple[Tensor, Any]:
    result = mixer(x, ctx, state)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"{type(mixer).__name__}.forward must return (y, state), got {type(result).__name__}")
    return result


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


def _check_shapes(cls: type) -> None:
    for dtype in (torch.float32, torch.float64):
        mixer = build_small(cls, dtype)
        x = _randn(2, 7, DIM, dtype=dtype)
        y, _ = _output(mixer, x, SeqContext.simple(2, 7))
        assert isinstance(y, Tensor), f"y must be a tensor, got {type(y).__name__}"
        assert y.shape == x.shape, f"{dtype}: y has shape {tuple(y.shape)}, expected {tuple(x.shape)}"
        assert y.dtype == dtype, f"y has dtype {y.dtype}, expected the input's {dtype}"
        assert y.device == x.device, f"y is on {y.device}, expected {x.device}"
        assert bool(torch.isfinite(y).all()), f"{dtype}: y contains NaN or inf"
    size = build_small(cls).state_size(16)
    assert isinstance(size, int) and size >= 0, f"state_size(16) must be a non-negative int, got {size!r}"


def _leakage_contexts(cls: type, T: int) -> list[tuple[str, SeqContext, int]]:
    """(description, causal context, t0) pairs; t0 is a block start when blocks are used."""
    out = [("causal", SeqContext.simple(2, T), 5)]
    if cls.supports_window:
        out.append(("causal + window 3", SeqContext.simple(2, T, window=3), 5))
    if cls.supports_blocks:
        blocks = _local_blocks(T).expand(2, T).contiguous()  # blocks start at 1, 4, 7, ...
        out.append(("causal + blocks", SeqContext(positions=torch.arange(T).expand(2, T).contiguous(),
                                                   block_ids=blocks), 4))
    if cls.supports_segments:
        out.append(("causal + packed segments", packed_context([[3, 5, 2], [6, 3]], T), 5))
    return out


def _check_no_future_leakage(cls: type) -> None:
    mixer = build_small(cls)
    T = 10
    x = _randn(2, T, DIM)
    for what, ctx, t0 in _leakage_contexts(cls, T):
        perturbed = x.clone()
        perturbed[:, t0:] += _randn(2, T - t0, DIM, seed=2)
        y, _ = _output(mixer, x, ctx)
        y2, _ = _output(mixer, perturbed, ctx)
        diff = _max_diff(y[:, :t0], y2[:, :t0])
        assert diff <= EXACT_TOL, (f"{what}: outputs before t0={t0} moved by {diff:.3g} when only x[:, {t0}:] "
                                   "changed (the future leaks into the past)")
        assert _max_diff(y[:, t0:], y2[:, t0:]) > 1e-8, (
            f"{what}: outputs from t0={t0} on did not change when x[:, {t0}:] changed (the check is vacuous: "
            "does y depend on x?)")


def _check_packed_equals_separate(cls: type) -> None:
    mixer = build_small(cls)
    rows, T = [[5, 4, 3], [7, 3]], 12
    x = _randn(2, T, DIM)
    variants = [(True, None, False)]
    if not cls.causal_only:
        variants.append((False, None, False))
    if cls.supports_window:
        variants.append((True, 3, False))
    if cls.supports_blocks:
        variants.append((True, None, True))
    for causal, window, blocks in variants:
        what = f"causal={causal}, window={window}, blocks={blocks}"
        y_packed, _ = _output(mixer, x, packed_context(rows, T, causal=causal, window=window, blocks=blocks))
        for b, lengths in enumerate(rows):
            start = 0
            for s, length in enumerate(lengths):
                ctx = _single_context(length, causal=causal, window=window, blocks=blocks)
                y_alone, _ = _output(mixer, x[b:b + 1, start:start + length], ctx)
                diff = _max_diff(y_packed[b:b + 1, start:start + length], y_alone)
                assert diff <= EQUIV_TOL, (f"{what}: row {b} segment {s} (tokens {start}..{start + length - 1}) "
                                           f"differs from running it alone by {diff:.3g} (segments leak)")
                start += length


def _state_contexts(cls: type, T: int, *, allow_blocks: bool) -> list[tuple[str, SeqContext]]:
    out = [("causal", SeqContext.simple(2, T, offset=3))]
    if cls.supports_segments:
        out.append(("packed segments", packed_context([[T - 4, 4], [3, T - 5]], T)))
    if cls.supports_window:
        out.append(("window 3", SeqContext.simple(2, T, window=3)))
    if allow_blocks and cls.supports_blocks:  # blocks [1,4), [4,7), [7,10): never cut by the splits below
        out.append(("blocks", SeqContext(positions=torch.arange(T).expand(2, T).contiguous(),
                                         block_ids=_local_blocks(T).expand(2, T).contiguous())))
    return out


def _run_chunks(mixer: SequenceMixer, x: Tensor, ctx: SeqContext, bounds: list[int]) -> Tensor:
    state = mixer.init_state(x.shape[0], x.device, x.dtype)
    ys = []
    for start, end in itertools.pairwise(bounds):
        y, state = _output(mixer, x[:, start:end], ctx.slice(start, end), state)
        assert state is not None, "a stateful forward returned state None"
        ys.append(y)
    return torch.cat(ys, dim=1)


def _check_chunks_equal_one_pass(cls: type, T: int, cuts: list[int], allow_blocks: bool, what_chunks: str) -> None:
    """Running ``x`` in the chunks ``cuts`` with the state carried equals one pass, in every state context."""
    mixer = build_small(cls)
    x = _randn(2, T, DIM)
    for what, ctx in _state_contexts(cls, T, allow_blocks=allow_blocks):
        y_full, _ = _output(mixer, x, ctx)
        diff = _max_diff(y_full, _run_chunks(mixer, x, ctx, cuts))
        assert diff <= EQUIV_TOL, f"{what}: {what_chunks} differs from one pass by {diff:.3g}"


def _check_state_split(cls: type) -> None:
    _check_chunks_equal_one_pass(cls, 10, [0, 4, 7, 10], True, "chunks [0,4) [4,7) [7,10) with carried state")


def _check_decode(cls: type) -> None:
    _check_chunks_equal_one_pass(cls, 8, list(range(9)), False, "token-by-token decoding")


def _check_gradients(cls: type) -> None:
    contexts = [("causal", SeqContext.simple(2, 9), True)]
    if cls.supports_segments:  # padding tokens have empty attention rows: gradients must stay finite
        contexts.append(("packed with padding", packed_context([[4, 3], [5]], 9), False))
    for what, ctx, require_nonzero in contexts:
        mixer = build_small(cls)
        x = _randn(2, 9, DIM).requires_grad_(True)
        y, _ = _output(mixer, x, ctx)
        (y * _randn(*y.shape, seed=3)).sum().backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all()), f"{what}: gradient w.r.t. x is not finite"
        if require_nonzero:
            assert bool(x.grad.abs().sum() > 0), f"{what}: gradient w.r.t. x is zero"
        for name, p in mixer.named_parameters():
            if not p.requires_grad:
                continue
            assert p.grad is not None, f"{what}: parameter {name} received no gradient (unused?)"
            assert bool(torch.isfinite(p.grad).all()), f"{what}: gradient of parameter {name} is not finite"
            if require_nonzero:
                assert bool(p.grad.abs().sum() > 0), f"{what}: gradient of parameter {name} is exactly zero"


@torch.no_grad()
def _check_residual_outputs(cls: type) -> None:
    """Zeroing :meth:`residual_outputs` (weights and biases) must make the output exactly 0: depth
    growth relies on it to insert identity blocks."""
    mixer = build_small(cls)
    outputs = mixer.residual_outputs()
    assert outputs, (f"{cls.__name__}.residual_outputs() is empty; declare the projection(s) that write the "
                     "output, so function-preserving growth can zero them")
    for lin in outputs:
        assert isinstance(lin, nn.Linear), f"residual_outputs() must hold nn.Linear modules, got {type(lin).__name__}"
        lin.weight.zero_()
        if lin.bias is not None:
            lin.bias.zero_()
    y, _ = _output(mixer, _randn(2, 9, DIM), SeqContext.simple(2, 9))
    assert bool((y == 0).all()), (f"{cls.__name__}: with its residual_outputs() zeroed the output is not exactly 0 "
                                  f"(max |y| = {float(y.abs().max()):.3g}); some path bypasses the declared outputs")


def _state_tensors(state: Any, prefix: str = "state") -> dict[str, Tensor]:
    """Every tensor in a (possibly nested) state: dataclass fields, tuples and lists, by dotted name."""
    if isinstance(state, Tensor):
        return {prefix: state}
    if dataclasses.is_dataclass(state):
        items = [(f.name, getattr(state, f.name)) for f in dataclasses.fields(state)]
    elif isinstance(state, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(state)]
    else:
        return {}
    out: dict[str, Tensor] = {}
    for name, value in items:
        out.update(_state_tensors(value, f"{prefix}.{name}"))
    return out


def _reference_cases(cls: type, T: int) -> list[tuple[str, SeqContext, int]]:
    """(description, context, carried-prefix length): the fast path and the reference both continue
    from the state the fast path left after ``x[:, :prefix]`` (0 = a fresh ``init_state``)."""
    out = [("causal", SeqContext.simple(2, T, offset=3), 0)]
    if cls.supports_segments:
        out.append(("packed with padding", packed_context([[4, 3, 2], [6]], T), 0))
    if cls.supports_state:
        out.append(("causal, continuing a state", SeqContext.simple(2, T, offset=3), 3))
        if cls.supports_segments:  # the first segment continues the carried one: its positions go on from 3
            packed = packed_context([[5, 4], [2, 6]], T)
            packed.positions[0, :5] += 3
            packed.positions[1, :2] += 3
            out.append(("packed, continuing a state", packed, 3))
    return out


def _loss_and_grads(mixer: SequenceMixer, forward: Callable[..., Any], x: Tensor, ctx: SeqContext, state: Any
                    ) -> tuple[Tensor, dict[str, Tensor], list[Tensor | None]]:
    """Output, returned state tensors, and gradients of a random projection of both w.r.t. x and
    every parameter (None where unused)."""
    y, new_state = forward(x, ctx, state)
    tensors = _state_tensors(new_state)
    loss = (y * _randn(*y.shape, seed=5)).sum()
    for i, value in enumerate(tensors.values()):
        if value.is_floating_point() and value.requires_grad:
            loss = loss + (value * _randn(*value.shape, seed=6 + i)).sum()
    params = [p for p in mixer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return y, tensors, list(grads)


def _check_reference(cls: type) -> None:
    mixer = build_small(cls)
    names = ["x", *(n for n, p in mixer.named_parameters() if p.requires_grad)]
    T = 10
    for what, ctx, prefix in _reference_cases(cls, T):
        x_all = _randn(2, T + prefix, DIM, seed=4)
        state = mixer.init_state(2, x_all.device, x_all.dtype) if cls.supports_state else None
        if prefix:  # positions 0..prefix-1 in segment 0, continued by the case's context
            pre_ctx = SeqContext.simple(2, prefix) if ctx.segment_ids is None else packed_context([[prefix]] * 2, prefix)
            with torch.no_grad():
                _, state = _output(mixer, x_all[:, :prefix], pre_ctx, state)
        x = x_all[:, prefix:].clone().requires_grad_(True)
        y, s_fast, g_fast = _loss_and_grads(mixer, mixer.forward, x, ctx, state)
        y_ref, s_ref, g_ref = _loss_and_grads(mixer, mixer.reference_forward, x, ctx, state)
        diff = _max_diff(y, y_ref)
        assert diff <= EQUIV_TOL, f"{what}: forward differs from reference_forward by {diff:.3g}"
        assert s_fast.keys() == s_ref.keys(), f"{what}: states differ in fields: {sorted(s_fast)} vs {sorted(s_ref)}"
        for key in s_fast:
            if s_fast[key].is_floating_point():
                diff = _max_diff(s_fast[key], s_ref[key])
                assert diff <= EQUIV_TOL, f"{what}: returned {key} differs from the reference's by {diff:.3g}"
            else:
                assert torch.equal(s_fast[key], s_ref[key]), f"{what}: returned {key} differs from the reference's"
        for name, a, b in zip(names, g_fast, g_ref, strict=True):
            assert (a is None) == (b is None), f"{what}: gradient of {name} is None on one path only"
            if a is not None:
                diff = _max_diff(a, b)
                assert diff <= EQUIV_TOL, f"{what}: gradient of {name} differs from the reference's by {diff:.3g}"


def _check_gradcheck(cls: type) -> None:
    mixer = build_small(cls)
    x = _randn(1, 6, DIM, seed=7).requires_grad_(True)
    ctx = SeqContext.simple(1, 6)
    ok = torch.autograd.gradcheck(lambda inp: _output(mixer, inp, ctx)[0], (x,), eps=1e-6, atol=1e-6, rtol=1e-4,
                                  raise_exception=False)
    assert ok, "torch.autograd.gradcheck w.r.t. x failed: the backward pass does not match finite differences"


def _check_extremes(cls: type) -> None:
    contexts = [("causal", SeqContext.simple(2, 9))]
    if cls.supports_segments:
        contexts.append(("packed with padding", packed_context([[4, 3], [5]], 9)))
    for setting, apply in cls.conformance_extremes().items():
        mixer = build_small(cls)
        with torch.no_grad():
            apply(mixer)
        for what, ctx in contexts:
            x = _randn(2, 9, DIM, seed=8).requires_grad_(True)
            y, _ = _output(mixer, x, ctx)
            assert bool(torch.isfinite(y).all()), f"{setting}, {what}: output is not finite"
            params = [p for p in mixer.parameters() if p.requires_grad]
            grads = torch.autograd.grad((y * _randn(*y.shape, seed=9)).sum(), [x, *params], allow_unused=True)
            bad = [n for n, g in zip(["x", *(n for n, p in mixer.named_parameters() if p.requires_grad)], grads,
                                     strict=True) if g is not None and not bool(torch.isfinite(g).all())]
            assert not bad, f"{setting}, {what}: gradients of {bad} are not finite"
            if hasattr(mixer, "reference_forward"):
                with torch.no_grad():
                    diff = _max_diff(y, mixer.reference_forward(x, ctx)[0])
                assert diff <= EQUIV_TOL, f"{setting}, {what}: forward differs from reference_forward by {diff:.3g}"


def _unsupported_features(cls: type) -> list[tuple[str, Callable[[SequenceMixer], Any]]]:
    """(feature, call that must raise MixerCapabilityError) for every capability the class lacks."""
    T = 6
    x = _randn(2, T, DIM)
    pos = torch.arange(T).expand(2, T).contiguous()
    out: list[tuple[str, Callable[[SequenceMixer], Any]]] = []
    if not cls.supports_segments:
        seg = torch.zeros(2, T, dtype=torch.long)
        seg[:, 3:] = 1
        out.append(("segment_ids", lambda m: m(x, SeqContext(positions=pos, segment_ids=seg))))
    if not cls.supports_blocks:
        blk = _local_blocks(T).expand(2, T).contiguous()
        out.append(("block_ids", lambda m: m(x, SeqContext(positions=pos, block_ids=blk))))
    if not cls.supports_window:
        out.append(("mask.window", lambda m: m(x, SeqContext.simple(2, T, window=3))))
    if cls.causal_only:
        out.append(("mask.causal=False", lambda m: m(x, SeqContext.simple(2, T, causal=False))))
    if not cls.supports_context_parallel:
        cp = ContextParallel(group=None, rank=0, world_size=2)
        out.append(("context parallel (cp.world_size=2)", lambda m: m(x, SeqContext(positions=pos, cp=cp))))
    if not cls.supports_state:
        out.append(("init_state", lambda m: m.init_state(2, "cpu", torch.float64)))
    return out


def _check_unsupported_raise(cls: type) -> None:
    mixer = build_small(cls)
    for feature, call in _unsupported_features(cls):
        try:
            call(mixer)
        except MixerCapabilityError:
            continue
        raise AssertionError(f"{cls.__name__} does not claim support for {feature} but did not raise "
                             "MixerCapabilityError when given it (a context feature must never be ignored)")


def mixer_checks(cls: type) -> list[Check]:
    """Named checks for a :class:`SequenceMixer` (or :class:`MemoryLayer`) class, chosen by its
    capability attributes."""
    checks: list[Check] = [
        ("shapes_and_dtype", lambda: _check_shapes(cls)),
        ("no_future_leakage", lambda: _check_no_future_leakage(cls)),
    ]
    if cls.supports_segments:
        checks.append(("packed_equals_separate", lambda: _check_packed_equals_separate(cls)))
    if cls.supports_state:
        checks.append(("state_split_equals_one_pass", lambda: _check_state_split(cls)))
        checks.append(("decode_equals_prefill", lambda: _check_decode(cls)))
    checks.append(("gradients_finite_nonzero", lambda: _check_gradients(cls)))
    checks.append(("gradcheck", lambda: _check_gradcheck(cls)))
    if _overrides(cls, SequenceMixer, "residual_outputs"):  # declared: growth will rely on it
        checks.append(("residual_outputs_zero_the_output", lambda: _check_residual_outputs(cls)))
    if hasattr(cls, "reference_forward"):
        checks.append(("reference_equals_fast", lambda: _check_reference(cls)))
    if hasattr(cls, "conformance_extremes"):
        checks.append(("gate_extremes", lambda: _check_extremes(cls)))
    if _unsupported_features(cls):
        checks.append(("unsupported_features_raise", lambda: _check_unsupported_raise(cls)))
    return checks


# --------------------------------------------------------------------------------------------------
# Other kinds: the contract's attributes only
# --------------------------------------------------------------------------------------------------


def _overrides(cls: type, base: type, method: str) -> bool:
    return getattr(cls, method, None) is not getattr(base, method, None)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape:
            return False
        if a.is_floating_point() or b.is_floating_point():
            return bool(torch.allclose(a.double(), b.double(), atol=1e-5))
        return bool(torch.equal(a, b))
    return a == b


def _tokenizer_checks(cls: type) -> list[Check]:
    def attributes() -> None:
        tok = cls()
        assert isinstance(tok.modality, str) and tok.modality, f"modality must be a non-empty str, got {tok.modality!r}"
        assert tok.kind in ("discrete", "continuous"), f"kind must be 'discrete' or 'continuous', got {tok.kind!r}"
        if tok.kind == "discrete":
            assert isinstance(tok.vocab_size, int) and tok.vocab_size >= 1, \
                f"a discrete tokenizer needs vocab_size >= 1, got {tok.vocab_size!r}"
            for name, idx in getattr(tok, "special_tokens", {}).items():
                assert isinstance(idx, int) and 0 <= idx < tok.vocab_size, \
                    f"special token {name!r} has id {idx!r}, outside [0, {tok.vocab_size})"
        else:
            assert isinstance(tok.latent_dim, int) and tok.latent_dim >= 1, \
                f"a continuous tokenizer needs latent_dim >= 1, got {tok.latent_dim!r}"

    def round_trip() -> None:
        tok = cls()
        raw = cls.conformance_sample()
        tokens = tok.encode(raw)
        if tok.kind == "discrete":
            assert isinstance(tokens, Tensor) and tokens.dim() == 1 and tokens.dtype == torch.long, \
                f"encode must return a 1-D int64 tensor, got {getattr(tokens, 'dtype', type(tokens))} " \
                f"{tuple(getattr(tokens, 'shape', ()))}"
            if tokens.numel():
                lo, hi = int(tokens.min()), int(tokens.max())
                assert 0 <= lo and hi < tok.vocab_size, f"token ids span [{lo}, {hi}], outside [0, {tok.vocab_size})"
        decoded = tok.decode(tokens)
        assert _same(decoded, raw), f"decode(encode(sample)) != sample: got {decoded!r:.200}, expected {raw!r:.200}"

    checks: list[Check] = [("tokenizer_attributes", attributes)]
    if hasattr(cls, "conformance_sample"):
        checks.append(("tokenizer_round_trip", round_trip))
    return checks


def _attribute_checks(kind: str, cls: type, base: type) -> list[Check]:
    def growth() -> None:
        assert cls.preserves in ("exact", "tolerance", "none"), \
            f"preserves must be 'exact', 'tolerance' or 'none', got {cls.preserves!r}"
        assert _overrides(cls, base, "apply"), f"{cls.__name__} does not implement apply()"

    def objective() -> None:
        assert _overrides(cls, base, "loss"), f"{cls.__name__} does not implement loss()"

    def task() -> None:
        assert isinstance(cls.name, str) and cls.name, f"a task needs a non-empty class attribute name, got {cls.name!r}"
        assert all(isinstance(m, str) for m in cls.modalities), f"modalities must be strings, got {cls.modalities!r}"
        assert _overrides(cls, base, "segments"), f"{cls.__name__} does not implement segments()"

    fn = {"growth": growth, "objectives": objective, "tasks": task}[kind]
    checks: list[Check] = [(f"{kind}_contract", fn)]
    if kind == "growth":
        from mmgrow.layers.attention import FullAttention
        from mmgrow.testing.growth_conformance import ARCHITECTURES, check_growth

        checks += [(f"growth_keeps_its_promise_{arch}", functools.partial(check_growth, cls, FullAttention, arch))
                   for arch in ARCHITECTURES]
    return checks


def run_checks(kind: str, cls: type) -> list[CheckResult]:
    """Run every applicable check on ``cls`` registered as ``kind``; never raises for a failing check.

    Mixers and memory layers get :func:`mixer_checks`; tokenizers their attributes and (with a
    ``conformance_sample()`` classmethod) an encode/decode round trip; growth strategies their contract
    attributes and :func:`~mmgrow.testing.growth_conformance.check_growth` with full attention (AR and
    DiT blocks, float64); objectives and tasks their contract attributes; datasets
    :func:`~mmgrow.testing.dataset_conformance.dataset_checks`. The class's own ``conformance_checks()`` run last.
    """
    from mmgrow.registry import base_class

    base = base_class(kind)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return [CheckResult("subclass", False, f"{cls!r} is not a subclass of {base.__module__}.{base.__name__}")]
    if kind in ("mixers", "memory"):
        checks = mixer_checks(cls)
    elif kind == "tokenizers":
        checks = _tokenizer_checks(cls)
    elif kind == "datasets":
        from mmgrow.testing.dataset_conformance import dataset_checks

        checks = dataset_checks(cls)
    else:
        checks = _attribute_checks(kind, cls, base)
    for i, extra in enumerate(cls.conformance_checks()):
        checks.append((f"plugin:{getattr(extra, '__name__', i)}", extra))

    results = []
    for name, check in checks:
        try:
            check()
        except AssertionError as exc:
            results.append(CheckResult(name, False, str(exc) or "assertion failed"))
        except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, named
            results.append(CheckResult(name, False, f"{type(exc).__name__}: {exc}"))
        else:
            results.append(CheckResult(name, True, ""))
    return results
