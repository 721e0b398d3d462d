"""Tokens -> mini-batch grid, and the sequential scan over mini-batches shared by the TTT forms.

Mini-batch TTT (Sun et al. 2024, arXiv 2407.04620, Sec. 2.4-2.5) groups the tokens of a sequence into
mini-batches of ``b`` tokens; all tokens of mini-batch ``i`` take their gradients at ``W_i``. mmgrow
aligns mini-batches **by positions**: token ``t`` sits at slot ``positions[t] % b`` of the mini-batch
``positions[t] // b`` of its segment. So mini-batches restart with every packed example (positions
restart per segment), continue across calls with a carried state (positions continue), and a
remainder, or a first mini-batch that starts at an offset, is simply a shorter mini-batch.

**The grid.** Per row, tokens are scattered to cells ``(n, c)``: ``n`` counts the mini-batches (of any
segment) met in this call, ``c`` is the token's rank inside its mini-batch (its slot minus the slot of
the mini-batch's first token in this call, so a call of one token uses one column). Empty cells hold
zeros (zero learning rate, so they contribute no gradient); rows with fewer mini-batches are padded
with empty ones, which leave the carry unchanged. Per cell-row the grid records whether mini-batch
``n`` starts a segment (``reset``: the carry becomes ``W0``) and whether it contains slot ``b - 1``
(``commit``: the mini-batch is complete and ``W_{i+1} = W_i - tok_last * acc`` is committed; else the
accumulated gradient stays pending in the carry, for the next call).

**The scan** runs sequentially over ``n``, vectorised over rows and heads, with a per-mini-batch
``step`` (dual form in :mod:`mmgrow.ops.ttt_dual`, primal form in :mod:`mmgrow.ops.ttt_primal`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmgrow.checks import positive_int
from mmgrow.ops.ttt_inner import InnerCarry, InnerParams, inner_output

Step = Callable[..., tuple[Tensor, list[Tensor], list[Tensor]]]
"""``step(q, k, target, lr, tok, carry, params, causal=, eps=, inner_norm=, acc_zero=) -> (z, d_acc_w, d_acc_b)``:
one mini-batch ``[B, H, L, d]`` (``lr [B, H, L]``, ``tok [B, 1, L]``) at the carry's weights; returns
the inner model's outputs ``f(q; W_eff)`` (the scan adds ``q + LN(.)`` for all mini-batches at once) and
the increments ``sum_s lr_s dl_s/dW`` of the accumulators. ``acc_zero=True``: the carry's accumulators
are zero (the step may skip reading them); ``pre``: the step's slice of ``prepare``'s tensors."""
Prepare = Callable[..., tuple[Tensor, ...]]
"""``prepare(qg, kg, tokg, causal=) -> tensors [B, *, N, ...]``, unbound along the mini-batch dim 2."""


@dataclass
class MiniBatchGrid:
    """Where each token sits in the ``[N, L]`` grid of one call (index tensors, no gradients).

    cell_of_token: ``[B, T]`` flat cell ``n * L + c`` of each token (``N * L`` for invalid tokens);
    token_of_cell: ``[B, N * L]`` token of each cell (``T`` for empty cells);
    reset:         ``[B, N]`` bool, mini-batch ``n`` starts from ``W0``;
    commit:        ``[B, N]`` bool, mini-batch ``n`` reaches slot ``b - 1``;
    commit_cell:   ``[B, N, L]`` bool, the cell of that slot-``b - 1`` token (whose token scale commits).
    """

    cell_of_token: Tensor
    token_of_cell: Tensor
    reset: Tensor
    commit: Tensor
    commit_cell: Tensor
    num_minibatches: int
    width: int
    identity: bool = False
    """Every token sits in cell ``t`` (all valid, positions ``0 .. T-1`` style alignment, ``T = N L``):
    scatter and gather are reshapes (no index copy)."""

    def scatter(self, x: Tensor) -> Tensor:
        """``x [B, H, T, *rest]`` -> ``[B, H, N, L, *rest]`` (zeros in empty cells)."""
        B, H = x.shape[:2]
        rest = x.shape[3:]
        if self.identity:
            return x.reshape(B, H, self.num_minibatches, self.width, *rest)
        padded = torch.cat([x, x.new_zeros(B, H, 1, *rest)], dim=2)
        index = self.token_of_cell.reshape(B, 1, -1, *([1] * len(rest))).expand(B, H, -1, *rest)
        return padded.gather(2, index).reshape(B, H, self.num_minibatches, self.width, *rest)

    def gather(self, grid: Tensor) -> Tensor:
        """``grid [B, H, N, L, *rest]`` -> ``[B, H, T, *rest]`` (zeros for invalid tokens)."""
        B, H = grid.shape[:2]
        rest = grid.shape[4:]
        flat = grid.reshape(B, H, -1, *rest)
        if self.identity:
            return flat
        flat = torch.cat([flat, flat.new_zeros(B, H, 1, *rest)], dim=2)
        index = self.cell_of_token.reshape(B, 1, -1, *([1] * len(rest))).expand(B, H, -1, *rest)
        return flat.gather(2, index)


def build_grid(positions: Tensor, mini_batch_size: int, reset: Tensor, valid: Tensor) -> MiniBatchGrid:
    """Place the valid tokens of each row in the mini-batch grid.

    Args:
        positions: ``[B, T]`` int64, position of each token in its segment (``>= 0``).
        mini_batch_size: ``b``.
        reset: ``[B, T]`` bool, the token starts a new segment (the state restarts from ``W0``).
        valid: ``[B, T]`` bool, False for padding tokens (not placed in the grid).

    Raises:
        ValueError: a position is negative, or positions do not increase by 1 inside a segment.
    """
    B, T = positions.shape
    device = positions.device
    positive_int("TTT", "mini_batch_size", mini_batch_size)
    b = mini_batch_size
    if bool(((positions < 0) & valid).any()):
        raise ValueError("TTT: positions must be >= 0 (slot = position % mini_batch_size)")
    if T > 1:
        steps = positions[:, 1:] - positions[:, :-1]
        broken = valid[:, 1:] & ~reset[:, 1:] & (steps != 1)
        if bool(broken.any()):
            row, t = (int(i) for i in broken.nonzero()[0])
            raise ValueError(f"TTT: positions must increase by 1 inside a segment (mini-batches are aligned by "
                             f"position), but row {row} goes from position {int(positions[row, t])} to "
                             f"{int(positions[row, t + 1])} at token {t + 1} without a segment change")
    slot = positions % b
    first_valid = valid & (valid.long().cumsum(dim=1) == 1)
    starts = valid & (reset | (slot == 0) | first_valid)
    minibatch = (starts.long().cumsum(dim=1) - 1).clamp_min(0)
    index = torch.arange(T, device=device).expand(B, T)
    start_index = torch.where(starts, index, torch.full_like(index, -1)).cummax(dim=1).values
    column = (index - start_index).clamp_min(0)

    num_minibatches = max(int(minibatch[valid].max()) + 1, 1) if bool(valid.any()) else 1
    width = max(int(column[valid].max()) + 1, 1) if bool(valid.any()) else 1
    cells = num_minibatches * width
    cell_of_token = torch.where(valid, minibatch * width + column, torch.full_like(index, cells))
    token_of_cell = torch.full((B, cells + 1), T, dtype=torch.long, device=device)
    token_of_cell.scatter_(1, cell_of_token, index)
    token_of_cell = token_of_cell[:, :cells]

    def cell_flags(flags: Tensor) -> Tensor:  # [B, T] bool -> [B, N, L] bool (False in empty cells)
        padded = torch.cat([flags & valid, flags.new_zeros(B, 1)], dim=1)
        return padded.gather(1, token_of_cell).reshape(B, num_minibatches, width)

    commit_cell = cell_flags(slot == b - 1)
    identity = cells == T and bool((token_of_cell == index).all())
    return MiniBatchGrid(cell_of_token=cell_of_token, token_of_cell=token_of_cell,
                         reset=cell_flags(reset)[:, :, 0], commit=commit_cell.any(dim=-1), commit_cell=commit_cell,
                         num_minibatches=num_minibatches, width=width, identity=identity)


def scan_minibatches(step: Step, grid: MiniBatchGrid, q: Tensor, k: Tensor, target: Tensor, lr: Tensor,
                     token_scale: Tensor, params: InnerParams, carry: InnerCarry, *, causal: bool, eps: float,
                     inner_norm: bool, prepare: Prepare | None = None) -> tuple[Tensor, InnerCarry]:
    """Run ``step`` over the grid's mini-batches in order: ``[B, H, T, d]`` -> ``(z [B, H, T, d], carry)``.

    ``lr [B, H, T]``, ``token_scale [B, T]``. ``prepare`` (optional) computes, for all mini-batches at
    once, what does not depend on the carried weights; each step receives its slice as ``pre``. The
    output ``q + LN(f(q; W_t))`` is formed once for the whole grid after the scan. Resets and commits are applied per row with ``where``
    (skipped when no row needs them: flags are read to the host once).

    Why ``unbind`` and one ``stack``: indexing the grid per step (``x[:, :, n]``) makes the backward of
    every slice allocate and zero-fill a gradient of the *whole* grid, so the backward pass cost
    ``O(N^2)`` (``aten::fill_`` was 31 % of the profile, exponent 1.74 at T = 4K..8K). ``unbind``'s
    backward is a single ``stack``, and the outputs are collected in a list and stacked once.
    The scan also tracks, on the host, whether the pending accumulators are known to be zero (after a
    commit of every row, or a zero start): the step is then told so (``acc_zero=True``) and skips them.
    """
    qg, kg, yg, lrg, tokg, commit_scale = _to_grid(grid, q, k, target, lr, token_scale)
    extras = prepare(qg, kg, tokg, causal=causal) if prepare is not None else ()
    steps = [x.unbind(dim=2) for x in (qg, kg, yg, lrg, tokg, commit_scale, *extras)]
    acc_zero = _accumulators_zero(carry)
    any_reset = grid.reset.any(dim=0).tolist()
    all_commit = grid.commit.all(dim=0).tolist()
    any_commit = grid.commit.any(dim=0).tolist()
    reset_rows, commit_rows = grid.reset.unbind(dim=1), grid.commit.unbind(dim=1)
    outputs = []
    for n, (qn, kn, yn, lrn, tokn, scale, *pre) in enumerate(zip(*steps, strict=True)):
        if any_reset[n]:
            carry = carry.reset_rows(reset_rows[n], params)
        z, d_acc_w, d_acc_b = step(qn, kn, yn, lrn, tokn, carry, params, causal=causal, eps=eps,
                                   inner_norm=inner_norm, acc_zero=acc_zero, pre=tuple(pre))
        outputs.append(z)
        if acc_zero:
            acc_w, acc_b = d_acc_w, d_acc_b
        else:
            acc_w = [a + d for a, d in zip(carry.acc_weights, d_acc_w, strict=True)]
            acc_b = [a + d for a, d in zip(carry.acc_biases, d_acc_b, strict=True)]
        if not any_commit[n]:
            carry, acc_zero = InnerCarry(carry.weights, carry.biases, acc_w, acc_b), False
            continue
        new_w = [w - scale[..., None, None] * a for w, a in zip(carry.weights, acc_w, strict=True)]
        new_b = [b - scale[..., None] * a for b, a in zip(carry.biases, acc_b, strict=True)]
        if all_commit[n]:  # the accumulators restart from zero: kept as the (unread) previous ones
            carry, acc_zero = InnerCarry(new_w, new_b, carry.acc_weights, carry.acc_biases), True
            continue
        rows = commit_rows[n]

        def pick(new: Tensor, old: Tensor, rows: Tensor = rows) -> Tensor:
            return torch.where(rows.reshape(-1, *([1] * (old.dim() - 1))), new, old)

        carry, acc_zero = InnerCarry([pick(nw, w) for nw, w in zip(new_w, carry.weights, strict=True)],
                                     [pick(nb, b) for nb, b in zip(new_b, carry.biases, strict=True)],
                                     [pick(torch.zeros_like(a), a) for a in acc_w],
                                     [pick(torch.zeros_like(a), a) for a in acc_b]), False
    if acc_zero:  # materialise the zero accumulators the caller sees
        carry = InnerCarry(carry.weights, carry.biases, [torch.zeros_like(w) for w in carry.weights],
                           [torch.zeros_like(b) for b in carry.biases])
    gamma, beta = params.ln_weight[None, :, None, None], params.ln_bias[None, :, None, None]
    z = inner_output(qg, torch.stack(outputs, dim=2), gamma, beta, eps, inner_norm)  # [B, H, N, L, d]
    return grid.gather(z), carry


def _to_grid(grid: MiniBatchGrid, q: Tensor, k: Tensor, target: Tensor, lr: Tensor, token_scale: Tensor
             ) -> tuple[Tensor, ...]:
    """``q, k, target [B, H, N, L, d]``, ``lr [B, H, N, L]``, ``tok [B, 1, N, L]`` and the commit scale
    ``[B, 1, N]`` (the token scale of the slot-``b - 1`` token)."""
    qg, kg, yg = grid.scatter(q), grid.scatter(k), grid.scatter(target)
    lrg = grid.scatter(lr.unsqueeze(-1)).squeeze(-1)  # [B, H, N, L]
    tokg = grid.scatter(token_scale.unsqueeze(1).unsqueeze(-1)).squeeze(-1)  # [B, 1, N, L]
    commit_scale = (tokg * grid.commit_cell.unsqueeze(1).to(tokg.dtype)).sum(dim=-1)  # [B, 1, N]
    return qg, kg, yg, lrg, tokg, commit_scale


def _accumulators_zero(carry: InnerCarry) -> bool:
    """Whether the pending accumulators are all zero and outside the autograd graph (then the steps may
    skip them; one host sync per call)."""
    acc = [*carry.acc_weights, *carry.acc_biases]
    return not any(a.requires_grad for a in acc) and not any(bool(a.ne(0).any()) for a in acc)


def fill_defaults(q: Tensor, positions: Tensor | None, reset: Tensor | None, valid: Tensor | None,
                  token_scale: Tensor, carry: InnerCarry | None, params: InnerParams
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, InnerCarry]:
    """The optional op arguments filled in: positions ``0 .. T-1``, no resets, all valid, ``W0``;
    ``token_scale`` expanded to ``[B, T]``."""
    B, _, T, _ = q.shape
    if positions is None:
        positions = torch.arange(T, device=q.device).expand(B, T)
    if reset is None:
        reset = torch.zeros(B, T, dtype=torch.bool, device=q.device)
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device)
    if carry is None:
        carry = InnerCarry.initial(params, B)
    return positions, reset, valid, token_scale.expand(B, T), carry
