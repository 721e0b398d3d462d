"""TTT ops: dual form == primal form == per-token autograd reference (float64, forward and backward),
mini-batch alignment by positions, packing, chunked calls with a carry, decoding, float32 accuracy,
gradcheck, the closed-form inner gradients, and the linear-attention equivalence."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from mmgrow.ops.ttt_dual import ttt_dual
from mmgrow.ops.ttt_grid import build_grid
from mmgrow.ops.ttt_inner import (
    InnerCarry,
    InnerParams,
    gelu_tanh_derivative,
    inner_forward,
    inner_shapes,
    keys_forward_and_grads,
    layer_norm,
    ln_l2_grad,
)
from mmgrow.ops.ttt_primal import ttt_primal, ttt_reference

F64 = torch.float64
TOL = 1e-10
FORMS = {"dual": ttt_dual, "primal": ttt_primal, "reference": ttt_reference}
B, H, T, D, MB = 2, 2, 11, 4, 4


def randn(*shape: int, gen: torch.Generator, scale: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype)


def make_params(kind: str, gen: torch.Generator, d: int = D, heads: int = H, dtype: torch.dtype = F64) -> InnerParams:
    shapes = inner_shapes(kind, d)
    return InnerParams([randn(heads, i, o, gen=gen, scale=0.4, dtype=dtype) for i, o in shapes],
                       [randn(heads, o, gen=gen, scale=0.1, dtype=dtype) for _, o in shapes],
                       (1 + randn(heads, d, gen=gen, scale=0.1)).to(dtype), randn(heads, d, gen=gen, scale=0.1,
                                                                                  dtype=dtype))


def make_inputs(gen: torch.Generator, b: int = B, t: int = T, d: int = D, heads: int = H,
                dtype: torch.dtype = F64) -> dict[str, Tensor]:
    return {"q": randn(b, heads, t, d, gen=gen, dtype=dtype), "k": randn(b, heads, t, d, gen=gen, dtype=dtype),
            "target": randn(b, heads, t, d, gen=gen, dtype=dtype),
            "lr": (0.1 + 0.5 * torch.rand(b, heads, t, generator=gen, dtype=F64)).to(dtype),
            "token_scale": (0.2 + torch.rand(b, t, generator=gen, dtype=F64)).to(dtype)}


def random_carry(params: InnerParams, gen: torch.Generator, batch: int = B) -> InnerCarry:
    w = [p.unsqueeze(0) + randn(batch, *p.shape, gen=gen, scale=0.1) for p in params.weights]
    b = [p.unsqueeze(0) + randn(batch, *p.shape, gen=gen, scale=0.1) for p in params.biases]
    return InnerCarry(w, b, [randn(*x.shape, gen=gen, scale=0.05) for x in w],
                      [randn(*x.shape, gen=gen, scale=0.05) for x in b])


def context(case: str) -> dict[str, Tensor | None]:
    """Positions / resets / validity of the cases: plain rows, offsets (remainders), packed rows with
    padding, and a carried state continued in the middle of a mini-batch."""
    positions = torch.arange(T).expand(B, T).clone()
    reset = torch.zeros(B, T, dtype=torch.bool)
    valid = torch.ones(B, T, dtype=torch.bool)
    if case == "offset":
        positions += torch.tensor([[3], [6]])
    elif case == "packed":  # row 0: [5 | 4 | pad pad], row 1: [3 | 8]
        positions[0] = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0])
        positions[1] = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7])
        reset[0, [0, 5, 9]] = True
        reset[1, [0, 3]] = True
        valid[0, 9:] = False
    elif case == "carry":
        positions += torch.tensor([[2], [5]])
    else:
        reset[:, 0] = True
    return {"positions": positions, "reset": reset, "valid": valid}


def leaves(inputs: dict[str, Tensor], params: InnerParams, carry: InnerCarry | None) -> list[Tensor]:
    out = [*inputs.values(), *params.weights, *params.biases, params.ln_weight, params.ln_bias]
    if carry is not None:
        out += carry.weights + carry.biases + carry.acc_weights + carry.acc_biases
    return out


def run_with_grads(form: str, inputs: dict[str, Tensor], params: InnerParams, carry: InnerCarry | None,
                   ctx: dict[str, Tensor | None], causal: bool, mb: int = MB) -> tuple[Tensor, list[Tensor], tuple]:
    """Outputs, final carry tensors, and gradients of a random projection of both w.r.t. every leaf."""
    z, final = FORMS[form](**inputs, params=params, mini_batch_size=mb, carry=carry, causal=causal, **ctx)
    state = final.weights + final.biases + final.acc_weights + final.acc_biases
    gen = torch.Generator().manual_seed(99)
    loss = (z * randn(*z.shape, gen=gen)).sum() + sum((s * randn(*s.shape, gen=gen)).sum() for s in state)
    return z, state, torch.autograd.grad(loss, leaves(inputs, params, carry), allow_unused=True)


def fresh_problem(kind: str, case: str, seed: int = 0) -> tuple[dict[str, Tensor], InnerParams, InnerCarry | None]:
    gen = torch.Generator().manual_seed(seed)
    params = make_params(kind, gen)
    inputs = make_inputs(gen)
    carry = random_carry(params, gen) if case == "carry" else None
    for t in leaves(inputs, params, carry):
        t.requires_grad_(True)
    return inputs, params, carry


# --------------------------------------------------------------------------------------------------
# dual == primal == reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", ["plain", "offset", "packed", "carry"])
def test_dual_primal_reference_agree_float64(kind: str, causal: bool, case: str) -> None:
    inputs, params, carry = fresh_problem(kind, case)
    ctx = context(case)
    z_ref, s_ref, g_ref = run_with_grads("reference", inputs, params, carry, ctx, causal)
    names = [*inputs, *(f"W0[{i}]" for i in range(len(params.weights))), *(f"b0[{i}]" for i in range(len(params.biases))),
             "ln_weight", "ln_bias", *(["carry"] * (0 if carry is None else 4 * len(params.weights)))]
    for form in ("dual", "primal"):
        z, s, g = run_with_grads(form, inputs, params, carry, ctx, causal)
        assert (z - z_ref).abs().max() <= TOL, f"{form}: outputs differ from the reference"
        for a, b in zip(s, s_ref, strict=True):
            assert (a - b).abs().max() <= TOL, f"{form}: final state differs from the reference"
        for name, a, b in zip(names, g, g_ref, strict=True):
            if carry is not None and name.startswith(("W0", "b0")):  # no reset: W0 is never used
                assert a is None and b is None, f"{form}: {name} used although the carry is continued"
                continue
            assert a is not None and b is not None, f"{form}: no gradient for {name}"
            assert (a - b).abs().max() <= TOL, f"{form}: gradient of {name} differs by {(a - b).abs().max():.3g}"
            assert a.abs().max() > 0 or name == "carry", f"{form}: gradient of {name} is zero (vacuous check)"
    assert (z_ref[~ctx["valid"].unsqueeze(1).expand_as(z_ref[..., 0])] == 0).all(), "padding outputs must be 0"


def test_inner_learning_actually_changes_the_state() -> None:
    """Guards the equality tests against a trivial inner loop: the state moves, and the mini-batch
    structure matters (b = 4 and b = 1 give different outputs)."""
    inputs, params, _ = fresh_problem("linear", "plain")
    z4, carry = ttt_dual(**inputs, params=params, mini_batch_size=4)
    z1, _ = ttt_dual(**inputs, params=params, mini_batch_size=1)
    assert (carry.weights[0] - params.weights[0]).abs().max() > 1e-2
    assert (z4 - z1).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Mini-batch alignment, packing, chunks, decoding
# --------------------------------------------------------------------------------------------------


def test_grid_aligns_minibatches_by_position() -> None:
    # positions 3 | 4 5 6 7 | reset: 0 1 | pad ; b = 4
    positions = torch.tensor([[3, 4, 5, 6, 7, 0, 1, 0]])
    reset = torch.tensor([[True, False, False, False, False, True, False, True]])
    valid = torch.tensor([[True] * 7 + [False]])
    grid = build_grid(positions, 4, reset, valid)
    assert (grid.num_minibatches, grid.width) == (3, 4)
    assert grid.token_of_cell.tolist() == [[0, 8, 8, 8, 1, 2, 3, 4, 5, 6, 8, 8]]
    assert grid.reset.tolist() == [[True, False, True]]
    assert grid.commit.tolist() == [[True, True, False]]  # slot 3 reached in the first two only
    assert grid.cell_of_token.tolist() == [[0, 4, 5, 6, 7, 8, 9, 12]]


def test_positions_must_increase_by_one_inside_a_segment() -> None:
    inputs, params, _ = fresh_problem("linear", "plain")
    positions = torch.arange(T).expand(B, T).clone()
    positions[1, 6:] += 1
    with pytest.raises(ValueError, match="increase by 1"):
        ttt_dual(**inputs, params=params, mini_batch_size=MB, positions=positions)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 6] = True  # ... unless a new segment starts there
    ttt_dual(**inputs, params=params, mini_batch_size=MB, positions=positions, reset=reset)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_packed_rows_equal_separate_sequences(kind: str, causal: bool) -> None:
    inputs, params, _ = fresh_problem(kind, "packed")
    ctx = context("packed")
    with torch.no_grad():
        z, _ = ttt_dual(**inputs, params=params, mini_batch_size=MB, causal=causal, **ctx)
        for row, bounds in ((0, [0, 5, 9]), (1, [0, 3, 11])):
            for start, end in itertools.pairwise(bounds):
                alone = {n: v[row:row + 1, ..., start:end] if v.dim() == 2 else v[row:row + 1, :, start:end]
                         for n, v in inputs.items()}
                z_alone, _ = ttt_dual(**alone, params=params, mini_batch_size=MB, causal=causal)
                assert (z[row:row + 1, :, start:end] - z_alone).abs().max() <= TOL, f"row {row} [{start}, {end})"


def run_chunks(form: str, inputs: dict[str, Tensor], params: InnerParams, ctx: dict[str, Tensor], cuts: list[int],
               causal: bool = True) -> tuple[Tensor, InnerCarry]:
    carry, outs = None, []
    for start, end in itertools.pairwise(cuts):
        part = {n: v[..., start:end] if n == "token_scale" else v[:, :, start:end] for n, v in inputs.items()}
        part_ctx = {n: v[:, start:end] for n, v in ctx.items()}
        z, carry = FORMS[form](**part, params=params, mini_batch_size=MB, carry=carry, causal=causal, **part_ctx)
        outs.append(z)
    return torch.cat(outs, dim=2), carry


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("case", ["plain", "offset", "packed"])
def test_chunks_with_carried_state_equal_one_pass(kind: str, form: str, case: str) -> None:
    inputs, params, _ = fresh_problem(kind, case)
    ctx = context(case)
    with torch.no_grad():
        z_full, c_full = ttt_dual(**inputs, params=params, mini_batch_size=MB, **ctx)
        # cuts inside mini-batches (5, 6) and at a boundary (8 for plain rows)
        z, c = run_chunks(form, inputs, params, ctx, [0, 5, 6, 8, T])
    assert (z - z_full).abs().max() <= TOL
    for a, b in zip(c.weights + c.acc_weights + c.biases + c.acc_biases,
                    c_full.weights + c_full.acc_weights + c_full.biases + c_full.acc_biases, strict=True):
        assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_token_by_token_decoding_equals_prefill(kind: str) -> None:
    inputs, params, _ = fresh_problem(kind, "offset")  # starts inside a mini-batch
    ctx = context("offset")
    with torch.no_grad():
        z_full, c_full = ttt_dual(**inputs, params=params, mini_batch_size=MB, **ctx)
        for form in ("primal", "dual"):
            z, c = run_chunks(form, inputs, params, ctx, list(range(T + 1)))
            assert (z - z_full).abs().max() <= TOL, form
            assert all((a - b).abs().max() <= TOL for a, b in zip(c.weights + c.acc_weights,
                                                                   c_full.weights + c_full.acc_weights, strict=True))
    # the final state is mid mini-batch: its accumulator is pending (not committed)
    assert c_full.acc_weights[0].abs().max() > 0


# --------------------------------------------------------------------------------------------------
# Precision, gradcheck, closed forms, equivalence
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_float32_dual_close_to_float64_reference(kind: str) -> None:
    """T = 32 (two mini-batches of 16), d = 16, token scale 1/t: max error of the float32 dual form
    relative to the largest float64 reference value <= 2e-6, outputs and final weights (measured ~2e-7)."""
    gen = torch.Generator().manual_seed(3)
    params64 = make_params(kind, gen, d=16)
    inputs64 = make_inputs(gen, b=1, t=32, d=16)
    inputs64["token_scale"] = 1.0 / (torch.arange(32) % 16 + 1).to(F64)[None]
    params32 = InnerParams([w.float() for w in params64.weights], [b.float() for b in params64.biases],
                           params64.ln_weight.float(), params64.ln_bias.float())
    with torch.no_grad():
        z64, c64 = ttt_reference(**inputs64, params=params64, mini_batch_size=16)
        z32, c32 = ttt_dual(**{n: v.float() for n, v in inputs64.items()}, params=params32, mini_batch_size=16)
    rel_z = (z32.double() - z64).abs().max() / z64.abs().max()
    rel_w = max(float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(c32.weights, c64.weights,
                                                                                        strict=True))
    assert rel_z <= 2e-6 and rel_w <= 2e-6, (float(rel_z), rel_w)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck_dual(kind: str, causal: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    params = make_params(kind, gen, d=3, heads=1)
    inputs = make_inputs(gen, b=1, t=5, d=3, heads=1)
    positions = torch.tensor([[1, 2, 3, 4, 5]])  # mini-batches {1}, {2, 3}, {4, 5} with b = 2
    tensors = [*inputs.values(), *params.weights, *params.biases, params.ln_weight, params.ln_bias]
    n = len(params.weights)

    def fn(*ts: Tensor) -> tuple[Tensor, Tensor]:
        p = InnerParams(list(ts[5:5 + n]), list(ts[5 + n:5 + 2 * n]), ts[-2], ts[-1])
        z, carry = ttt_dual(*ts[:5], p, mini_batch_size=2, positions=positions, causal=causal)
        return z, carry.weights[0]

    assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_(True) for t in tensors], eps=1e-6, atol=1e-7)


def test_closed_form_ln_l2_gradient_equals_autograd() -> None:
    gen = torch.Generator().manual_seed(5)
    z = randn(3, 2, 6, 8, gen=gen).requires_grad_(True)
    target, gamma, beta = randn(3, 2, 6, 8, gen=gen), 1 + randn(2, 1, 8, gen=gen), randn(2, 1, 8, gen=gen)
    (auto,) = torch.autograd.grad(0.5 * ((layer_norm(z, gamma, beta) - target) ** 2).sum(), z)
    assert (ln_l2_grad(z, target, gamma, beta) - auto).abs().max() <= 1e-13
    # our layer_norm is torch's LayerNorm with per-head affine parameters
    torch_ln = F.layer_norm(z, (8,), eps=1e-6) * gamma + beta
    assert (layer_norm(z, gamma, beta) - torch_ln).abs().max() <= 1e-13


def test_gelu_derivative_and_mlp_gradients_equal_autograd() -> None:
    gen = torch.Generator().manual_seed(6)
    x = randn(1000, gen=gen, scale=3.0).requires_grad_(True)
    (auto,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    assert (gelu_tanh_derivative(x) - auto).abs().max() <= 1e-14
    params = make_params("mlp", gen)
    weights = [w.clone().requires_grad_(True) for w in params.weights]
    biases = [b.clone().requires_grad_(True) for b in params.biases]
    k, target = randn(H, 5, D, gen=gen), randn(H, 5, D, gen=gen)
    gamma, beta = params.ln_weight[:, None], params.ln_bias[:, None]
    loss = 0.5 * ((layer_norm(inner_forward(k, weights, biases), gamma, beta) - target) ** 2).sum()
    auto = torch.autograd.grad(loss, weights + biases)
    inputs, grads = keys_forward_and_grads(k, target, params.weights, params.biases, gamma, beta)
    closed = [x.transpose(-1, -2) @ g for x, g in zip(inputs, grads, strict=True)] + [g.sum(-2) for g in grads]
    for a, b in zip(closed, auto, strict=True):
        assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "batch_gd"])
def test_ttt_linear_without_norm_from_zero_is_linear_attention(causal: bool) -> None:
    """Paper equivalence (Sun et al. 2024, Thm. 1): TTT-Linear, one mini-batch, no LayerNorm, W0 = 0
    -> z_t - q_t = tok_t sum_{s in M(t)} lr_s (q_t . k_s + 1) y_s: linear attention whose keys carry an
    extra constant feature (the inner bias b1, whose gradient is -y_s)."""
    gen = torch.Generator().manual_seed(7)
    inputs = make_inputs(gen, t=8)
    params = InnerParams([torch.zeros(H, D, D, dtype=F64)], [torch.zeros(H, D, dtype=F64)],
                         torch.ones(H, D, dtype=F64), torch.zeros(H, D, dtype=F64))
    z, _ = ttt_dual(**inputs, params=params, mini_batch_size=8, causal=causal, inner_norm=False)
    q, k, y, lr, tok = inputs.values()
    scores = q @ k.transpose(-1, -2) + 1.0
    if causal:
        scores = scores.tril()
    expected = q + tok[:, None, :, None] * (scores @ (lr.unsqueeze(-1) * y))
    assert (z - expected).abs().max() <= 1e-12
