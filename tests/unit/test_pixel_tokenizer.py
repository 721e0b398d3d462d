"""PixelTokenizer: exact quantisation vs a float64 loop reference, layout, round trip, blocks, constraint."""

import numpy as np
import pytest
import torch

import mmgrow
from mmgrow.protocols import NO_BLOCK
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE, PixelTokenizer


def reference_ids(video: np.ndarray, grid: int, palette: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] uint8 -> [F, G, G] palette ids, one cell at a time in float64."""
    f, h, w, _ = video.shape
    ch, cw = h // grid, w // grid
    out = np.zeros((f, grid, grid), dtype=np.int64)
    for t in range(f):
        for i in range(grid):
            for j in range(grid):
                cell = video[t, i * ch:(i + 1) * ch, j * cw:(j + 1) * cw].astype(np.float64)
                mean = cell.reshape(-1, 3).mean(axis=0)
                dists = [float(((mean - p.astype(np.float64)) ** 2).sum()) for p in palette]
                out[t, i, j] = min(range(len(dists)), key=lambda k: (dists[k], k))
    return out


@pytest.fixture
def codec():
    return PixelTokenizer(grid=4)


def random_video(frames=3, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, h, w, 3), generator=g, dtype=torch.uint8)


def test_registered_with_default_palette():
    c = mmgrow.create("tokenizers", "pixels")
    assert isinstance(c, PixelTokenizer) and c.modality == "video" and c.kind == "discrete"
    assert c.grid == 8 and c.tokens_per_frame == 65
    assert c.palette.tolist() == [list(v) for v in DEFAULT_PALETTE.values()]
    assert len(DEFAULT_PALETTE) >= 12 and len(set(DEFAULT_PALETTE.values())) == len(DEFAULT_PALETTE)
    assert sorted(c.special_tokens) == ["bov", "eof", "eov"]
    assert sorted(c.special_tokens.values()) == list(range(len(DEFAULT_PALETTE), c.vocab_size))


def test_quantisation_matches_float64_reference(codec):
    video = random_video(frames=3, h=8, w=12)
    expected = reference_ids(video.numpy(), 4, codec.palette.numpy())
    assert torch.equal(codec.quantize(video), torch.from_numpy(expected))
    # the decoded frames are exactly the palette colours of those ids
    assert torch.equal(codec.decode(codec.encode(video)), codec.palette[torch.from_numpy(expected)])


def test_ties_go_to_the_lower_palette_id():
    c = PixelTokenizer(grid=1, palette=[(0, 0, 0), (2, 2, 2), (1, 1, 9)])
    frame = torch.tensor([[[0, 0, 0], [2, 2, 2]]], dtype=torch.uint8)  # mean (1,1,1): distance 3 to both
    assert reference_ids(frame[None].numpy(), 1, c.palette.numpy()).item() == 0
    assert c.quantize(frame).item() == 0


def test_layout(codec):
    video = random_video(frames=3)
    ids = codec.encode(video)
    bov, eof, eov = (codec.special_tokens[n] for n in ("bov", "eof", "eov"))
    assert ids.dtype == torch.long and ids.shape == (1 + 3 * 17,) and codec.num_tokens(3) == ids.numel()
    assert ids[0] == bov
    frames = ids[1:].reshape(3, 17)
    assert frames[:, -1].tolist() == [eof, eof, eov]
    assert torch.equal(frames[:, :-1].reshape(3, 4, 4), codec.quantize(video))
    assert int(frames[:, :-1].max()) < codec.num_colours


def test_image_is_one_frame(codec):
    image = random_video(frames=1)[0]
    ids = codec.encode(image)
    assert ids.shape == (18,) and ids[-1] == codec.special_tokens["eov"]
    assert codec.decode(ids).shape == (1, 4, 4, 3)


def test_round_trip_of_palette_video_is_exact():
    c = PixelTokenizer(grid=4)
    g = torch.Generator().manual_seed(1)
    cells = torch.randint(0, c.num_colours, (2, 4, 4), generator=g)
    video = c.palette[cells].repeat_interleave(3, dim=1).repeat_interleave(2, dim=2)  # [2, 12, 8, 3]
    assert torch.equal(c.quantize(video), cells)
    assert torch.equal(c.decode(c.encode(video)), c.palette[cells])


def test_decode_is_robust(codec):
    video = random_video(frames=2)
    ids = codec.encode(video)
    full = codec.decode(ids)
    assert torch.equal(codec.decode(ids[1:]), full)  # no leading bov
    assert torch.equal(codec.decode(torch.cat([ids, ids[1:5]])), full)  # anything after eov ignored
    # a non-palette id at a cell position decodes to the background palette[0]
    broken = ids.clone()
    broken[3] = codec.special_tokens["bov"]
    out = codec.decode(broken)
    assert out[0, 0, 2].tolist() == codec.palette[0].tolist()
    assert torch.equal(out[1], full[1])
    # a short last frame (generation cut off) is padded with the background colour
    short = codec.decode(ids[: 1 + 17 + 5])
    assert short.shape == (2, 4, 4, 3)
    assert torch.equal(short[1].reshape(16, 3)[:5], full[1].reshape(16, 3)[:5])
    assert (short[1].reshape(16, 3)[5:] == codec.palette[0]).all()
    assert codec.decode(torch.tensor([], dtype=torch.long)).shape == (0, 4, 4, 3)


def test_block_ids_one_per_frame(codec):
    ids = codec.encode(random_video(frames=3))
    blocks = codec.block_ids(ids)
    expected = [NO_BLOCK] + [f for f in range(3) for _ in range(17)]
    assert blocks.tolist() == expected
    # without the leading bov the frames are still numbered from 0
    assert codec.block_ids(ids[1:]).tolist() == expected[1:]


def test_generation_constraint_allows_exactly_the_layout(codec):
    frames = 3
    allowed = codec.generation_constraint(frames)
    ids = codec.encode(random_video(frames=frames))
    eof, eov = codec.special_tokens["eof"], codec.special_tokens["eov"]
    for k in range(frames * codec.tokens_per_frame):
        mask = allowed(k)
        assert mask.dtype == torch.bool and mask.shape == (codec.vocab_size,)
        assert mask[ids[1 + k]]  # every encoded video satisfies the constraint
        if (k + 1) % codec.tokens_per_frame:
            assert mask.nonzero().flatten().tolist() == list(range(codec.num_colours))
        else:
            assert mask.nonzero().flatten().tolist() == [eov if k == frames * 17 - 1 else eof]
    with pytest.raises(IndexError, match="generation step 51 is outside a 3-frame video"):
        allowed(frames * codec.tokens_per_frame)
    # returned masks are copies: editing one does not change later answers
    allowed(0)[:] = False
    assert allowed(0).sum() == codec.num_colours


def test_sampling_under_the_constraint_decodes_to_the_requested_frames(codec):
    g = torch.Generator().manual_seed(0)
    allowed = codec.generation_constraint(2)
    seq = [codec.special_tokens["bov"]]
    for k in range(2 * codec.tokens_per_frame):
        logits = torch.randn(codec.vocab_size, generator=g).masked_fill(~allowed(k), float("-inf"))
        seq.append(int(torch.multinomial(logits.softmax(-1), 1, generator=g)))
    frames = codec.decode(torch.tensor(seq))
    assert frames.shape == (2, 4, 4, 3)
    assert torch.equal(codec.encode(frames.repeat_interleave(2, 1).repeat_interleave(2, 2)), torch.tensor(seq))


def test_bad_inputs_raise_clear_errors(codec):
    with pytest.raises(TypeError, match="dtype uint8 pixels, got torch.float32"):
        codec.encode(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"shape \[F, H, W, 3\] or \[H, W, 3\], got \(1, 8, 8, 4\)"):
        codec.encode(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="frame size 8x10 is not divisible by grid=4"):
        codec.encode(torch.zeros(1, 8, 10, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="got list"):
        codec.encode([[0, 0, 0]])
    with pytest.raises(ValueError, match="grid must be a positive int, got 0"):
        PixelTokenizer(grid=0)
    with pytest.raises(ValueError, match=r"palette colour \(0, 0, 300\) is not an RGB triple"):
        PixelTokenizer(palette=[(0, 0, 0), (0, 0, 300)])
    with pytest.raises(ValueError, match="palette colours must be distinct"):
        PixelTokenizer(palette=[(1, 2, 3), (1, 2, 3)])
    with pytest.raises(ValueError, match="num_frames must be a positive int, got 0"):
        codec.generation_constraint(0)
    with pytest.raises(TypeError, match="integer tokens, got dtype torch.float32"):
        codec.decode(torch.tensor([1.0]))


def test_generation_prefix_and_length_follow_the_layout():
    codec = PixelTokenizer(grid=2)
    video = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    tokens = codec.encode(video)
    prefix = codec.generation_prefix()
    assert torch.equal(tokens[: len(prefix)], prefix)
    body = tokens[len(prefix):]
    assert codec.generation_length(torch.cat([body, body])) == len(body)  # cut after the first eov
    assert codec.generation_length(body[:-1]) == len(body) - 1  # no eov sampled: keep everything
