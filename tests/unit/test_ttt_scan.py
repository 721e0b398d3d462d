"""The mini-batch scan's speed-ups keep the maths: the identity grid (reshape instead of index copies),
the hoisted dual-form scores, zero accumulators that are skipped, and a backward graph without
per-mini-batch slices of the whole grid (the cause of the super-linear backward)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mmgrow.ops.ttt_dual import dual_prepare, dual_step, ttt_dual
from mmgrow.ops.ttt_grid import build_grid
from mmgrow.ops.ttt_inner import InnerCarry, InnerParams, inner_shapes
from mmgrow.ops.ttt_primal import ttt_reference

F64 = torch.float64


def randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=gen, dtype=F64)


def params_and_inputs(kind: str, B: int = 2, H: int = 2, T: int = 8, d: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = inner_shapes(kind, d)
    params = InnerParams([randn(H, i, o, gen=gen, scale=0.4) for i, o in shapes],
                         [randn(H, o, gen=gen, scale=0.1) for _, o in shapes],
                         1 + randn(H, d, gen=gen, scale=0.1), randn(H, d, gen=gen, scale=0.1))
    inputs = {"q": randn(B, H, T, d, gen=gen), "k": randn(B, H, T, d, gen=gen), "target": randn(B, H, T, d, gen=gen),
              "lr": 0.1 + 0.5 * torch.rand(B, H, T, generator=gen, dtype=F64),
              "token_scale": 0.2 + torch.rand(B, T, generator=gen, dtype=F64)}
    return params, inputs


def test_identity_grid_is_detected_and_equals_the_index_path() -> None:
    B, T, b = 2, 12, 4
    positions = torch.arange(T).expand(B, T)
    none = torch.zeros(B, T, dtype=torch.bool)
    grid = build_grid(positions, b, none, ~none)
    assert grid.identity
    general = dataclasses.replace(grid, identity=False)
    x = torch.randn(B, 3, T, 5, dtype=F64)
    assert torch.equal(grid.scatter(x), general.scatter(x))
    assert torch.equal(grid.gather(grid.scatter(x)), general.gather(general.scatter(x)))
    assert torch.equal(grid.gather(grid.scatter(x)), x)
    # a remainder, an offset or padding is not the identity
    assert not build_grid(torch.arange(10).expand(B, 10), b, none[:, :10], ~none[:, :10]).identity
    assert not build_grid(positions + 1, b, none, ~none).identity
    padded = (~none).clone()
    padded[1, -1] = False
    assert not build_grid(positions, b, none, padded).identity


def test_dual_step_without_prepared_tensors_equals_with_them() -> None:
    for kind in ("linear", "mlp"):
        params, x = params_and_inputs(kind, T=4)
        carry = InnerCarry.initial(params, 2)
        tok = x["token_scale"].unsqueeze(1)
        args = (x["q"], x["k"], x["target"], x["lr"], tok, carry, params)
        kw = {"causal": True, "eps": 1e-6, "inner_norm": True}
        pre = tuple(t.squeeze(2) for t in dual_prepare(x["q"].unsqueeze(2), x["k"].unsqueeze(2), tok.unsqueeze(2),
                                                        causal=True))
        z0, w0, b0 = dual_step(*args, **kw)
        z1, w1, b1 = dual_step(*args, **kw, pre=pre)
        assert torch.equal(z0, z1) and all(torch.equal(a, c) for a, c in zip(w0 + b0, w1 + b1, strict=True))


def test_zero_accumulators_that_require_grad_still_receive_gradients() -> None:
    """A carry whose accumulators are zero but are graph inputs must not take the skipping path."""
    params, x = params_and_inputs("linear", T=6)
    grads = []
    for op in (ttt_dual, ttt_reference):
        carry = InnerCarry.initial(params, 2)
        acc = [torch.zeros_like(a).requires_grad_(True) for a in carry.acc_weights]
        carry = InnerCarry(carry.weights, carry.biases, acc, carry.acc_biases)
        z, _ = op(**x, params=params, mini_batch_size=4, carry=carry)
        (z * torch.cos(torch.arange(z.numel(), dtype=F64)).reshape(z.shape)).sum().backward()
        grads.append(acc[0].grad)
    assert grads[0].abs().max() > 1e-3
    assert (grads[0] - grads[1]).abs().max() <= 1e-12


def graph_node_names(t: Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def test_backward_graph_has_no_per_minibatch_slices_of_the_grid() -> None:
    """``x[:, :, n]`` per step (SelectBackward0) makes every step's backward zero-fill a whole-grid
    gradient (O(N^2) in total); the scan unbinds once and stacks once instead."""
    params, x = params_and_inputs("mlp", T=16)
    x = {k: v.requires_grad_(True) for k, v in x.items()}
    z, _ = ttt_dual(**x, params=params, mini_batch_size=4)
    names = graph_node_names(z)
    assert "UnbindBackward0" in names and "StackBackward0" in names
    assert not names & {"SelectBackward0", "CopySlices", "IndexPutBackward0"}, names
