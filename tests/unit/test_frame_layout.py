"""FrameLayout: LWM frame serialisation on a tiny layout, expected tensors derived by hand.

Layout under test: 2 codes per frame, codes 0..2, then bov = 3, eof = 4, eov = 5 (vocab 6).
"""

import pytest
import torch

from mmgrow.protocols import NO_BLOCK
from mmgrow.tokenizers.frame_layout import FrameLayout, token_ids
from mmgrow.tokenizers.pixels import PixelTokenizer
from mmgrow.tokenizers.vq import VQVideoTokenizer

LAYOUT = FrameLayout(codes_per_frame=2, num_codes=3, bov=3, eof=4, eov=5)


def t(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def test_serialize_and_round_trip():
    ids = torch.tensor([[0, 1], [2, 0]])
    tokens = LAYOUT.serialize(ids)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, t(3, 0, 1, 4, 2, 0, 5))
    assert torch.equal(LAYOUT.frames(tokens), ids)
    assert torch.equal(LAYOUT.serialize(torch.tensor([[2, 2]])), t(3, 2, 2, 5))  # one frame: eov, no eof
    assert LAYOUT.tokens_per_frame == 3


@pytest.mark.parametrize("tokens, expected", [
    ([0, 1, 4, 2, 0, 5], [[0, 1], [2, 0]]),  # leading bov is optional
    ([3, 1, 2, 5, 0, 0, 4], [[1, 2]]),  # stop at the first eov
    ([3, 0, 1, 4, 2], [[0, 1], [2, 0]]),  # a tail without end token is a last frame, padded
    ([1, 4, 5], [[1, 0], [0, 0]]),  # short frame padded; an empty frame closed by eov still counts
    ([0, 1, 2, 4], [[0, 1]]),  # extra codes dropped
    ([3, 3, 7, 4, -1, 2, 5], [[0, 0], [0, 2]]),  # stray bov, out-of-range and negative ids -> code 0
    ([3, 5], [[0, 0]]),  # bov eov: one empty frame
])
def test_frames_is_robust_to_sampled_output(tokens, expected):
    got = LAYOUT.frames(tokens)
    assert got.dtype == torch.long
    assert torch.equal(got, torch.tensor(expected))
    assert torch.equal(LAYOUT.frames(torch.tensor(tokens, dtype=torch.int32)), got)


@pytest.mark.parametrize("tokens", [[], [3]])
def test_frames_empty(tokens):
    got = LAYOUT.frames(tokens)
    assert got.shape == (0, 2) and got.dtype == torch.long


def test_block_ids():
    assert torch.equal(LAYOUT.block_ids(t(3, 0, 1, 4, 2, 0, 5, 1)), t(NO_BLOCK, 0, 0, 0, 1, 1, 1, NO_BLOCK))
    assert torch.equal(LAYOUT.block_ids([0, 4, 1]), t(0, 0, 1))  # no bov, no eov: every token in a frame
    assert LAYOUT.block_ids([]).shape == (0,)


def test_generation_prefix_and_length():
    assert torch.equal(LAYOUT.generation_prefix(), t(3))
    assert LAYOUT.generation_length(t(0, 1, 4, 2, 5, 1)) == 5
    assert LAYOUT.generation_length(t(0, 1, 4)) == 3


def test_generation_constraint():
    allowed = LAYOUT.generation_constraint(2, vocab_size=6)
    code = torch.tensor([True, True, True, False, False, False])
    eof = torch.tensor([False, False, False, False, True, False])
    eov = torch.tensor([False, False, False, False, False, True])
    for step, expected in enumerate([code, code, eof, code, code, eov]):
        assert torch.equal(allowed(step), expected), step
    with pytest.raises(IndexError, match=r"generation step 6 is outside a 2-frame video \(steps 0\.\.5 after bov\)"):
        allowed(6)
    with pytest.raises(IndexError, match="outside a 4-frame video"):
        LAYOUT.generation_constraint(2, vocab_size=6, what="4-frame")(-1)
    with pytest.raises(ValueError, match="frames must be a positive int, got 0"):
        LAYOUT.generation_constraint(0, vocab_size=6)


def test_argument_errors():
    with pytest.raises(ValueError, match=r"FrameLayout.serialize: expected code ids \[F >= 1, 2\], got shape \(2, 3\)"):
        LAYOUT.serialize(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="got shape"):
        LAYOUT.serialize(torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="here: expected integer tokens, got dtype torch.float32"):
        token_ids(torch.zeros(3), "here")
    with pytest.raises(ValueError, match=r"here: expected a 1-D tensor of tokens \[N\], got shape \(1, 3\)"):
        token_ids(torch.zeros(1, 3, dtype=torch.long), "here")
    with pytest.raises(TypeError, match="here: expected a sequence of ints"):
        token_ids([1, True], "here")
    with pytest.raises(TypeError, match="got str"):
        token_ids("abc", "here")
    with pytest.raises(TypeError, match="FrameLayout.frames: expected integer tokens"):
        LAYOUT.frames(torch.zeros(2))


def test_codecs_share_the_layout():
    """Both codecs put bov, eof, eov right after their codes."""
    assert PixelTokenizer(grid=2).frame_layout == FrameLayout(codes_per_frame=4, num_codes=12, bov=12, eof=13, eov=14)
    vq = VQVideoTokenizer(frame_size=8, levels=1, hidden=4, num_codes=5, code_dim=2)
    assert vq.frame_layout == FrameLayout(codes_per_frame=16, num_codes=5, bov=5, eof=6, eov=7)
