"""Mamba-2's SSD ops: the chunked algorithm against the per-token recurrence (float64 oracle), forward
and backward, resets, state carrying, extremes, precision, and the mamba-ssm adapter (with a fake
kernel module on CPU)."""

from __future__ import annotations

import itertools
import sys
import types

import pytest
import torch

from mmgrow.layers.mamba2 import Mamba2
from mmgrow.ops import ssd_cuda
from mmgrow.ops.ssd import ssd_chunked, ssd_recurrent
from mmgrow.protocols import MixerCapabilityError, SeqContext

F64_TOL = 1e-10
NAMES = ("x", "dt", "A", "B", "C", "initial_state")


def _inputs(Bt: int, T: int, H: int, P: int, G: int, N: int, *, seed: int = 0, dtype: torch.dtype = torch.float64,
            resets: bool = True) -> dict:
    """Random SSD inputs; resets at random places plus t=0 of row 0 (not of the last row) and a
    consecutive pair in row 1."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "x": torch.randn(Bt, T, H, P, generator=g, dtype=torch.float64),
        "dt": torch.rand(Bt, T, H, generator=g, dtype=torch.float64) * 0.8 + 0.05,
        "A": -(torch.rand(H, generator=g, dtype=torch.float64) * 2 + 0.1),
        "B": torch.randn(Bt, T, G, N, generator=g, dtype=torch.float64),
        "C": torch.randn(Bt, T, G, N, generator=g, dtype=torch.float64),
        "initial_state": torch.randn(Bt, H, N, P, generator=g, dtype=torch.float64),
    }
    out = {k: v.to(dtype) for k, v in out.items()}
    if resets:
        reset = torch.rand(Bt, T, generator=g) < 0.2
        if T > 0:
            reset[0, 0] = True  # row 0 drops its initial state at once; row 1 keeps it
            reset[-1, 0] = Bt == 1
        if T > 4 and Bt > 1:
            reset[1, 2:4] = True
        out["reset"] = reset
    return out


def _run(fn, inputs: dict, grads: bool = True, **kw):
    """``(y, final_state, gradients of a random projection of both w.r.t. NAMES)``."""
    leaves = {k: (v.clone().requires_grad_(True) if k in NAMES and v is not None else v) for k, v in inputs.items()}
    y, state = fn(**leaves, **kw)
    if not grads:
        return y, state, None
    g = torch.Generator().manual_seed(123)  # float64 draws, so every precision gets the same projection
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum() + \
        (state * torch.randn(state.shape, generator=g, dtype=torch.float64).to(state.dtype)).sum()
    wrt = [leaves[k] for k in NAMES if leaves.get(k) is not None]
    if not loss.requires_grad:  # nothing reaches the outputs (T == 0 without an initial state)
        return y, state, [torch.zeros_like(w) for w in wrt]
    return y, state, torch.autograd.grad(loss, wrt, materialize_grads=True)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _assert_same(fast, ref, tol: float = F64_TOL) -> None:
    y, s, gf = fast
    y_ref, s_ref, gr = ref
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    assert _max_diff(y, y_ref) <= tol, f"y differs by {_max_diff(y, y_ref):.3g}"
    assert _max_diff(s, s_ref) <= tol, f"final state differs by {_max_diff(s, s_ref):.3g}"
    if gf is not None:
        for name, a, b in zip(NAMES, gf, gr, strict=False):
            assert _max_diff(a, b) <= tol, f"gradient w.r.t. {name} differs by {_max_diff(a, b):.3g}"


# ------------------------------------------------------------------------------------------------
# Chunked == recurrent (float64)


@pytest.mark.parametrize(("T", "chunk", "G"), [(13, 4, 2), (16, 4, 1), (3, 8, 1), (1, 4, 2), (0, 4, 1), (11, 1, 2),
                                               (9, 5, 1)])
@pytest.mark.parametrize("with_state_and_resets", [True, False])
def test_chunked_equals_recurrent_forward_and_backward(T: int, chunk: int, G: int, with_state_and_resets: bool) -> None:
    inputs = _inputs(2, T, 4, 3, G, 5, seed=T, resets=with_state_and_resets)
    if not with_state_and_resets:
        inputs["initial_state"] = None
    fast = _run(ssd_chunked, inputs, chunk_size=chunk)
    ref = _run(ssd_recurrent, inputs)
    _assert_same(fast, ref)
    assert fast[0].shape == (2, T, 4, 3) and fast[1].shape == (2, 4, 5, 3)
    if T > 0:  # the gradients compared above are not trivially zero (A acts only on a nonzero state)
        trivial = {"A"} if (T == 1 and not with_state_and_resets) else set()
        assert all(float(g.abs().max()) > 0 for n, g in zip(NAMES, ref[2], strict=False) if n not in trivial)


def test_empty_sequence_returns_the_initial_state() -> None:
    inputs = _inputs(2, 0, 4, 3, 2, 5)
    for fn in (ssd_chunked, ssd_recurrent):
        y, state, _ = _run(fn, inputs, grads=False)
        assert y.shape == (2, 0, 4, 3)
        assert torch.equal(state, inputs["initial_state"])


def test_chunked_does_not_depend_on_the_chunk_size() -> None:
    inputs = _inputs(2, 23, 4, 3, 2, 5, seed=7)
    runs = [_run(ssd_chunked, inputs, chunk_size=q) for q in (1, 2, 5, 8, 23, 64)]
    for other in runs[1:]:
        _assert_same(other, runs[0])


# ------------------------------------------------------------------------------------------------
# Resets and carried states


@pytest.mark.parametrize("fn", [ssd_chunked, ssd_recurrent])
def test_resets_equal_running_the_pieces_separately(fn) -> None:
    inputs = _inputs(1, 14, 4, 3, 2, 5, seed=3, resets=False)
    cuts = [0, 5, 6, 7, 11, 14]  # resets at 5, 6 (consecutive: a one-token piece), 7 and 11
    reset = torch.zeros(1, 14, dtype=torch.bool)
    reset[0, cuts[1:-1]] = True
    y, state, _ = _run(fn, {**inputs, "reset": reset}, grads=False)
    for start, end in itertools.pairwise(cuts):
        piece = {k: (v[:, start:end] if k not in ("A", "initial_state") else v) for k, v in inputs.items()}
        if start > 0:
            piece["initial_state"] = None  # a reset starts from zeros; the first piece keeps the initial state
        y_piece, state_piece, _ = _run(fn, piece, grads=False)
        assert _max_diff(y[:, start:end], y_piece) <= 1e-12, f"piece [{start}, {end}) differs"
    assert _max_diff(state, state_piece) <= 1e-12


@pytest.mark.parametrize("fn", [ssd_chunked, ssd_recurrent])
@pytest.mark.parametrize("split", [1, 6, 9])
def test_split_with_carried_state_equals_one_pass(fn, split: int) -> None:
    inputs = _inputs(2, 15, 4, 3, 2, 5, seed=5)
    kw = {"chunk_size": 4} if fn is ssd_chunked else {}
    y, state, _ = _run(fn, inputs, grads=False, **kw)
    first = {k: (v[:, :split] if k in ("x", "dt", "B", "C", "reset") else v) for k, v in inputs.items()}
    y1, s1, _ = _run(fn, first, grads=False, **kw)
    second = {k: (v[:, split:] if k in ("x", "dt", "B", "C", "reset") else v) for k, v in inputs.items()}
    second["initial_state"] = s1
    y2, s2, _ = _run(fn, second, grads=False, **kw)
    assert _max_diff(torch.cat([y1, y2], dim=1), y) <= F64_TOL
    assert _max_diff(s2, state) <= F64_TOL


def test_padding_tokens_of_the_last_chunk_change_nothing() -> None:
    """A final state after 10 tokens with chunks of 4 (2 padding tokens) equals the state after 10
    tokens run as one exact chunk, and equals the recurrence."""
    inputs = _inputs(2, 10, 4, 3, 2, 5, seed=11)
    _assert_same(_run(ssd_chunked, inputs, chunk_size=4), _run(ssd_chunked, inputs, chunk_size=10))


# ------------------------------------------------------------------------------------------------
# Extremes, precision, gradcheck


def test_decay_exactly_one_accumulates_every_write() -> None:
    """A = 0: a_t = 1, so the state is h0 + sum_t dt_t B_t x_t^T (independent closed form) and y_t reads
    the running sum."""
    inputs = {**_inputs(2, 11, 4, 3, 2, 5, seed=2, resets=False), "A": torch.zeros(4, dtype=torch.float64)}
    fast, ref = _run(ssd_chunked, inputs, chunk_size=4), _run(ssd_recurrent, inputs)
    _assert_same(fast, ref)
    B_h = inputs["B"].repeat_interleave(2, dim=2)
    writes = inputs["dt"][..., None, None] * B_h[..., :, None] * inputs["x"][..., None, :]  # [Bt, T, H, N, P]
    running = inputs["initial_state"][:, None] + writes.cumsum(dim=1)
    C_h = inputs["C"].repeat_interleave(2, dim=2)
    assert _max_diff(fast[1], running[:, -1]) <= F64_TOL
    assert _max_diff(fast[0], torch.einsum("bthnp,bthn->bthp", running, C_h)) <= F64_TOL


def test_decay_underflowing_to_zero_forgets_everything() -> None:
    """dt * A ~ -1e4 (exp underflows to 0): no memory, y_t = dt_t (C_t . B_t) x_t, finite gradients."""
    inputs = _inputs(2, 11, 4, 3, 2, 5, seed=4)
    inputs["A"] = torch.full((4,), -1e3, dtype=torch.float64)
    inputs["dt"] = inputs["dt"] + 10.0
    fast, ref = _run(ssd_chunked, inputs, chunk_size=4), _run(ssd_recurrent, inputs)
    _assert_same(fast, ref)
    for grad in fast[2]:
        assert bool(torch.isfinite(grad).all())
    B_h, C_h = (inputs[k].repeat_interleave(2, dim=2) for k in ("B", "C"))
    local = inputs["dt"][..., None] * (B_h * C_h).sum(-1, keepdim=True) * inputs["x"]
    assert _max_diff(fast[0], local) <= F64_TOL


def test_zero_step_sizes_keep_the_state() -> None:
    """dt = 0 on some tokens (decay 1, no write) and on a whole row (the state passes through)."""
    inputs = _inputs(2, 10, 4, 3, 2, 5, seed=6, resets=False)
    inputs["dt"][0, ::3] = 0.0
    inputs["dt"][1] = 0.0
    fast, ref = _run(ssd_chunked, inputs, chunk_size=4), _run(ssd_recurrent, inputs)
    _assert_same(fast, ref)
    assert all(bool(torch.isfinite(g).all()) for g in fast[2])
    assert _max_diff(fast[1][1], inputs["initial_state"][1]) == 0.0


def test_float32_chunked_is_close_to_the_float64_recurrence() -> None:
    """Relative RMS error of float32 chunked vs float64 recurrent stays below 1e-5 (measured ~1e-7)."""
    inputs = _inputs(2, 200, 4, 16, 2, 16, seed=8)
    ref = _run(ssd_recurrent, inputs)
    fast = _run(ssd_chunked, {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()},
                chunk_size=32)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    for name, a, b in [("y", fast[0], ref[0]), ("state", fast[1], ref[1]),
                       *zip(NAMES, fast[2], ref[2], strict=True)]:
        rel = float((a.detach().double() - b.detach()).norm() / b.detach().norm())
        assert rel <= 1e-5, f"{name}: float32 relative RMS error {rel:.3g}"


def test_bfloat16_inputs_are_computed_in_float32() -> None:
    """bf16 in, bf16 out, but the maths in float32: the error is the bf16 rounding of the output only."""
    inputs = _inputs(1, 40, 4, 8, 1, 8, seed=9)
    low = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()}
    y, state, _ = _run(ssd_chunked, low, grads=False, chunk_size=16)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    y_ref, s_ref, _ = _run(ssd_recurrent, {k: (v.double() if v.is_floating_point() else v) for k, v in low.items()},
                           grads=False)
    assert float((y.double() - y_ref).detach().norm() / y_ref.detach().norm()) <= 4e-3  # bf16 has 8 bits: 2^-9 ~ 2e-3 per entry
    assert float((state.double() - s_ref).norm() / s_ref.norm()) <= 4e-3


def test_gradcheck_chunked() -> None:
    inputs = _inputs(1, 5, 2, 2, 1, 2, seed=10)
    inputs["reset"][0] = torch.tensor([False, False, True, False, False])
    leaves = [inputs[k].clone().requires_grad_(True) for k in NAMES]

    def fn(x, dt, A, B, C, h0):
        return ssd_chunked(x, dt, A, B, C, chunk_size=2, initial_state=h0, reset=inputs["reset"])

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("bad", ["x", "dt", "A", "B_groups", "C", "state", "reset", "chunk"])
def test_bad_shapes_raise(bad: str) -> None:
    inputs = _inputs(2, 6, 4, 3, 2, 5)
    kw = {"chunk_size": 4}
    if bad == "x":
        inputs["x"] = inputs["x"][..., None]
    elif bad == "dt":
        inputs["dt"] = inputs["dt"][:, :, :3]
    elif bad == "A":
        inputs["A"] = inputs["A"][:2]
    elif bad == "B_groups":  # 4 heads cannot share 3 groups
        inputs["B"] = inputs["C"] = torch.zeros(2, 6, 3, 5, dtype=torch.float64)
    elif bad == "C":
        inputs["C"] = inputs["C"][:, :, :, :4]
    elif bad == "state":
        inputs["initial_state"] = inputs["initial_state"].transpose(-1, -2)
    elif bad == "reset":
        inputs["reset"] = inputs["reset"].long()
    else:
        kw = {"chunk_size": 0}
    with pytest.raises(ValueError, match="ssd"):
        ssd_chunked(**inputs, **kw)
    if bad != "chunk":
        with pytest.raises(ValueError, match="ssd"):
            ssd_recurrent(**inputs)


# ------------------------------------------------------------------------------------------------
# The mamba-ssm adapter, with a fake kernel module implementing mamba-ssm's documented contract


class FakeMambaSSM:
    """Stands in for ``mamba_ssm.ops.triton.ssd_combined``: checks the arguments against mamba-ssm's
    documented layout (x [b,l,h,p], initial_states [b,h,p,n] float32, seq_idx [b,l] int32 where the
    state is cut whenever the id changes and the initial state belongs to id 0) and computes with our
    own chunked op."""

    def __init__(self) -> None:
        self.calls = 0

    def mamba_chunk_scan_combined(self, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                  initial_states=None, seq_idx=None, dt_softplus=False,
                                  dt_limit=(0.0, float("inf")), return_final_states=False):
        self.calls += 1
        b, l, h, p = x.shape
        n = B.shape[-1]
        assert D is None and z is None and dt_bias is None and not dt_softplus and return_final_states
        assert dt.shape == (b, l, h) and A.shape == (h,) and A.dtype == torch.float32
        assert B.dtype == C.dtype == x.dtype and all(t.is_contiguous() for t in (x, dt, A, B, C))
        if initial_states is not None:
            assert initial_states.shape == (b, h, p, n) and initial_states.dtype == torch.float32
            initial_states = initial_states.transpose(-1, -2)
        reset = None
        if seq_idx is not None:
            assert seq_idx.shape == (b, l) and seq_idx.dtype == torch.int32
            previous = torch.cat([torch.zeros_like(seq_idx[:, :1]), seq_idx[:, :-1]], dim=1)
            reset = seq_idx != previous
        y, final = ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_states, reset=reset)
        return y, final.transpose(-1, -2).float()


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> FakeMambaSSM:
    """Installs the fake ``mamba_ssm`` package and makes the CPU count as CUDA for the adapter."""
    fake = FakeMambaSSM()
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"]
    for name in names:
        module = types.ModuleType(name)
        module.__path__ = []  # a package
        monkeypatch.setitem(sys.modules, name, module)
    kernel_module = types.ModuleType(ssd_cuda.KERNEL_MODULE)
    kernel_module.mamba_chunk_scan_combined = fake.mamba_chunk_scan_combined
    monkeypatch.setitem(sys.modules, ssd_cuda.KERNEL_MODULE, kernel_module)
    monkeypatch.setattr(ssd_cuda, "_cuda_device", lambda device: True)
    return fake


def test_availability_needs_cuda_and_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # "not installed": any import of it fails
    assert not ssd_cuda.mamba_ssm_available("cpu")
    monkeypatch.setattr(ssd_cuda, "_cuda_device", lambda device: True)
    assert not ssd_cuda.mamba_ssm_available("cuda")


def test_availability_is_false_on_cpu_even_with_the_package(fake_kernel: FakeMambaSSM,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert ssd_cuda.mamba_ssm_available("cpu")  # the fixture pretends the CPU is CUDA
    monkeypatch.undo()
    assert not ssd_cuda.mamba_ssm_available("cpu")


def test_reset_to_seq_idx() -> None:
    reset = torch.tensor([[False, False, True, True, False, True], [True, False, False, False, False, False]])
    expected = torch.tensor([[0, 0, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]], dtype=torch.int32)
    assert torch.equal(ssd_cuda.reset_to_seq_idx(reset), expected)


@pytest.mark.parametrize("with_state_and_resets", [True, False])
def test_adapter_equals_chunked(fake_kernel: FakeMambaSSM, with_state_and_resets: bool) -> None:
    inputs = {k: (v.float() if v.is_floating_point() else v)  # P=3 != N=5: a missed transpose cannot pass
              for k, v in _inputs(2, 13, 4, 3, 2, 5, seed=12, resets=with_state_and_resets).items()}
    if not with_state_and_resets:
        inputs["initial_state"] = None
    fast = _run(ssd_cuda.ssd_mamba_ssm, inputs, chunk_size=4)
    ref = _run(ssd_chunked, inputs, chunk_size=4)
    assert fake_kernel.calls == 1
    assert fast[1].dtype == torch.float32
    _assert_same(fast, ref, tol=1e-6)


def test_adapter_refuses_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        ssd_cuda.ssd_mamba_ssm(**_inputs(1, 4, 2, 2, 1, 2), chunk_size=4)


def _layer(kernel: str, dtype: torch.dtype = torch.float32) -> Mamba2:
    torch.manual_seed(0)
    return Mamba2(dim=32, kernel=kernel, **Mamba2.conformance_kwargs()).to(dtype)


def test_layer_dispatches_to_the_adapter(fake_kernel: FakeMambaSSM) -> None:
    """auto: the kernel for T > 1 in float32 (packed rows and carried state included), the recurrent
    step for T == 1, chunked for float64; results equal kernel='chunked'."""
    auto, chunked = _layer("auto"), _layer("chunked")
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    seg = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [-1] * 3])
    ctx = SeqContext(positions=torch.zeros(2, 10, dtype=torch.long), segment_ids=seg)
    assert auto.kernel_for(x) == "mamba_ssm"
    y, state = auto(x, ctx)
    y_ref, state_ref = chunked(x, ctx)
    assert fake_kernel.calls == 1
    assert _max_diff(y, y_ref) <= 1e-5 and _max_diff(state.ssm, state_ref.ssm) <= 1e-5
    step = SeqContext(positions=torch.zeros(2, 1, dtype=torch.long), segment_ids=seg[:, -1:])
    y1, _ = auto(x[:, :1], step, state)
    y1_ref, _ = chunked(x[:, :1], step, state_ref)
    assert fake_kernel.calls == 1 and auto.kernel_for(x[:, :1]) == "recurrent"
    assert _max_diff(y1, y1_ref) <= 1e-5
    auto64 = _layer("auto", torch.float64)
    assert auto64.kernel_for(x.double()) == "chunked"
    auto64(x.double(), ctx)
    assert fake_kernel.calls == 1


def test_forced_mamba_ssm_kernel(fake_kernel: FakeMambaSSM, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer("mamba_ssm")
    x = torch.randn(1, 6, 32)
    layer(x, SeqContext.simple(1, 6))
    assert fake_kernel.calls == 1
    with pytest.raises(MixerCapabilityError, match="mamba_ssm"):
        _layer("mamba_ssm", torch.float64)(x.double(), SeqContext.simple(1, 6))
    monkeypatch.undo()  # the CPU is a CPU again
    with pytest.raises(MixerCapabilityError, match="CUDA"):
        layer(x, SeqContext.simple(1, 6))
