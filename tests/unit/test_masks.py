"""attention_mask against a brute-force double loop written straight from the MaskSpec docstring."""

from __future__ import annotations

import random

import pytest
import torch

from mmgrow.layers.masks import attention_mask, mask_from_context
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec, SeqContext


def brute_force_row(q_pos, k_pos, spec, q_seg, k_seg, q_blk, k_blk, q_idx, k_idx) -> list[list[bool]]:
    """One row's mask: key j visible from query i iff segments, causality and window all allow it."""
    rows = []
    for i in range(len(q_pos)):
        row = []
        for j in range(len(k_pos)):
            visible = True
            if q_seg is not None:
                visible &= q_seg[i] == k_seg[j] and q_seg[i] != PAD_SEGMENT and k_seg[j] != PAD_SEGMENT
            if spec.causal:
                same_block = q_blk is not None and q_blk[i] == k_blk[j] and q_blk[i] != NO_BLOCK
                visible &= k_idx[j] <= q_idx[i] or same_block
            if spec.window is not None:
                visible &= abs(q_pos[i] - k_pos[j]) < spec.window
            row.append(visible)
        rows.append(row)
    return rows


def random_row(rng: random.Random, T: int):
    """Packed segments (some padding, also between examples), restarted positions, random blocks."""
    seg, pos, blk = [], [], []
    s = 0
    while len(seg) < T:
        length = min(rng.randint(1, 5), T - len(seg))
        sid = PAD_SEGMENT if rng.random() < 0.2 else s
        seg += [sid] * length
        pos += list(range(length))
        start_block = rng.randint(0, 3)
        blk += [NO_BLOCK if k < start_block else 10 * s + (k - start_block) // 2 for k in range(length)]
        s += 1
    return seg, pos, blk


SPECS = [MaskSpec(causal=c, window=w) for c in (True, False) for w in (None, 1, 2, 4)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("use_segments", [False, True])
@pytest.mark.parametrize("use_blocks", [False, True])
def test_prefill_mask_matches_brute_force(spec: MaskSpec, use_segments: bool, use_blocks: bool) -> None:
    rng = random.Random(4 * SPECS.index(spec) + 2 * use_segments + use_blocks)
    B, T = 3, 11
    rows = [random_row(rng, T) for _ in range(B)]
    seg = torch.tensor([r[0] for r in rows]) if use_segments else None
    pos = torch.tensor([r[1] for r in rows])
    blk = torch.tensor([r[2] for r in rows]) if use_blocks else None
    ctx = SeqContext(positions=pos, segment_ids=seg, block_ids=blk, mask=spec)
    got = mask_from_context(ctx)
    for b in range(B):
        expected = brute_force_row(
            rows[b][1], rows[b][1], spec,
            rows[b][0] if use_segments else None, rows[b][0] if use_segments else None,
            rows[b][2] if use_blocks else None, rows[b][2] if use_blocks else None,
            list(range(T)), list(range(T)),
        )
        assert got[b].tolist() == expected, f"row {b} differs for {spec}"


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_kv_cache_mask_matches_brute_force(spec: MaskSpec) -> None:
    """Queries are the last Tq tokens of a stream whose first S tokens are cached keys."""
    rng = random.Random(7)
    S, Tq = 9, 4
    seg, pos, blk = random_row(rng, S + Tq)
    k_idx = list(range(S + Tq))
    q_idx = k_idx[S:]
    t = torch.tensor
    got = attention_mask(t([pos[S:]]), t([pos]), spec, t([seg[S:]]), t([seg]), t([blk[S:]]), t([blk]),
                         q_index=t(q_idx), k_index=t(k_idx))
    expected = brute_force_row(pos[S:], pos, spec, seg[S:], seg, blk[S:], blk, q_idx, k_idx)
    assert got[0].tolist() == expected


def test_drawn_example() -> None:
    """The example drawn in docs/attention.md: causal, segments [0 0 0 1 1 P], block {1, 2}."""
    seg = torch.tensor([[0, 0, 0, 1, 1, PAD_SEGMENT]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    blk = torch.tensor([[NO_BLOCK, 5, 5, NO_BLOCK, NO_BLOCK, NO_BLOCK]])
    got = attention_mask(pos, pos, MaskSpec(causal=True), seg, seg, blk, blk).int()[0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # token 1 sees token 2: same block
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],  # a new example starts: nothing before it is visible
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],  # padding sees nothing
    ])
    assert torch.equal(got, expected)


def test_window_uses_positions_not_indices() -> None:
    # Same index distance, different position distance: a cache continuing at position 100.
    pos = torch.tensor([[100, 101, 105]])
    got = attention_mask(pos, pos, MaskSpec(causal=True, window=3))[0]
    assert got.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


def test_errors_name_the_problem() -> None:
    q_pos, k_pos = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="needs q_index and k_index"):
        attention_mask(q_pos, k_pos, MaskSpec(causal=True))
    with pytest.raises(ValueError, match="segment ids for both queries and keys"):
        attention_mask(q_pos, k_pos, MaskSpec(causal=False), q_seg=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"q_index must be \[2\] or \[1, 2\]"):
        attention_mask(q_pos, k_pos, MaskSpec(), q_index=torch.arange(3), k_index=torch.arange(5))
    with pytest.raises(ValueError, match="q_pos and k_pos must be"):
        attention_mask(torch.zeros(2), k_pos, MaskSpec())


def test_non_causal_without_indices_allows_different_lengths() -> None:
    q_pos, k_pos = torch.arange(2)[None], torch.arange(5)[None]
    assert bool(attention_mask(q_pos, k_pos, MaskSpec(causal=False)).all())
