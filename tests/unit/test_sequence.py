"""SequenceBuilder, tasks and pad_collate: global ids, modality / block ids, loss masks, padding."""

import pytest
import torch

import mmgrow
from mmgrow.data.collate import pad_collate
from mmgrow.data.sequence import EncodedSequence, SequenceBuilder
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, Sample, Segment, Tokenizer
from mmgrow.tokenizers.pixels import PixelTokenizer
from mmgrow.tokenizers.text import ByteTokenizer
from mmgrow.tokenspace import TokenSpace


def video(frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 8, 8, 3), generator=g, dtype=torch.uint8)


@pytest.fixture
def codecs():
    return {"text": ByteTokenizer(), "video": PixelTokenizer(grid=2)}


def test_text_to_video_sequence(codecs):
    builder = SequenceBuilder(codecs)
    text_size = codecs["text"].vocab_size
    assert builder.token_space.to_dict() == {"text": text_size, "video": codecs["video"].vocab_size}
    sample = Sample(media={"video": video()}, text="a cat")
    segs = mmgrow.create("tasks", "text_to_video").segments(sample)
    assert [(s.modality, s.role) for s in segs] == [("text", "input"), ("video", "target")]
    seq = builder.build(segs)

    t = codecs["text"].encode("a cat")
    v = codecs["video"].encode(sample.media["video"])
    n_t, n_v = t.numel(), v.numel()
    assert len(seq) == n_t + n_v
    assert seq.input_ids.tolist() == t.tolist() + (v + text_size).tolist()
    assert seq.modality_ids.tolist() == [0] * n_t + [1] * n_v
    assert seq.loss_mask.dtype == torch.float32
    assert seq.loss_mask.tolist() == [0.0] * n_t + [1.0] * n_v  # bov is a target
    assert seq.block_ids.tolist() == [NO_BLOCK] * n_t + codecs["video"].block_ids(v).tolist()
    assert seq.positions.tolist() == list(range(n_t + n_v))


def test_video_to_text_and_a_given_token_space(codecs):
    space = TokenSpace.from_dict({"video": 20, "text": codecs["text"].vocab_size})  # video first, 3 ids reserved
    builder = SequenceBuilder(codecs, space)
    sample = Sample(media={"video": video()}, text="hi")
    seq = builder.build(mmgrow.create("tasks", "video_to_text").segments(sample))
    v = codecs["video"].encode(sample.media["video"])
    t = codecs["text"].encode("hi")
    assert seq.input_ids.tolist() == v.tolist() + (t + 20).tolist()
    assert seq.modality_ids.tolist() == [0] * v.numel() + [1] * t.numel()
    assert seq.loss_mask.tolist() == [0.0] * v.numel() + [1.0] * t.numel()
    # global ids map back to the modality they came from
    assert torch.equal(space.modality_of(seq.input_ids), seq.modality_ids)


def test_block_ids_are_unique_across_segments(codecs):
    builder = SequenceBuilder(codecs)
    segs = [Segment("video", video(2, 0)), Segment("text", "and then"), Segment("video", video(3, 1), "target")]
    seq = builder.build(segs)
    blocks = seq.block_ids[seq.block_ids >= 0]
    first = codecs["video"].block_ids(codecs["video"].encode(video(2, 0)))
    n1 = first.numel()
    assert seq.block_ids[:n1].tolist() == first.tolist()
    assert sorted(set(blocks.tolist())) == list(range(5))  # frames 0,1 then 2,3,4
    tpf = codecs["video"].tokens_per_frame
    assert (seq.block_ids == 4).sum() == tpf


def test_builder_errors(codecs):
    builder = SequenceBuilder(codecs)
    with pytest.raises(KeyError, match=r"no codec for modality 'audio'; codecs are given for \['text', 'video'\]"):
        builder.build([Segment("audio", torch.zeros(3))])
    with pytest.raises(ValueError, match="role must be one of"):
        builder.build([Segment("text", "x", "output")])
    with pytest.raises(ValueError, match="no segments"):
        builder.build([])
    with pytest.raises(ValueError, match="gives 'video' 5 ids but its codec needs vocab_size=15"):
        SequenceBuilder(codecs, TokenSpace.from_dict({"text": 259, "video": 5}))
    with pytest.raises(ValueError, match="'video' has a codec but is not in the token space"):
        SequenceBuilder(codecs, TokenSpace.from_dict({"text": 259}))

    class Latents(Tokenizer):
        kind = "continuous"

    with pytest.raises(ValueError, match="must declare a positive latent_dim"):
        SequenceBuilder({"video": Latents()})
    with pytest.raises(TypeError, match="expected an mmgrow.protocols.Tokenizer"):
        SequenceBuilder({"text": "bytes"})
    with pytest.raises(KeyError, match=r"has no 'video' media \(it has \['audio'\]\)"):
        mmgrow.create("tasks", "text_to_video").segments(Sample(media={"audio": 1}, text="x"))


def make_seq(n, offset=0):
    return EncodedSequence(
        input_ids=torch.arange(offset + 1, offset + n + 1), modality_ids=torch.arange(n) % 2,
        block_ids=torch.arange(n) // 2, loss_mask=(torch.arange(n) % 3 == 0).float(), positions=torch.arange(n),
    )


def test_pad_collate_right_pads():
    seqs = [make_seq(3), make_seq(5, 10)]
    batch = pad_collate(seqs, seq_len=None)
    assert batch.input_ids.shape == (2, 5)
    for row, s in enumerate(seqs):
        n = len(s)
        for name in ("input_ids", "modality_ids", "block_ids", "loss_mask", "positions"):
            assert torch.equal(getattr(batch, name)[row, :n], getattr(s, name)), name
        assert (batch.segment_ids[row, :n] == 0).all() and (batch.example_weight[row, :n] == 1).all()
    pad = batch.segment_ids == PAD_SEGMENT
    assert pad.tolist() == [[False] * 3 + [True] * 2, [False] * 5]
    assert (batch.input_ids[pad] == 0).all() and (batch.loss_mask[pad] == 0).all()
    assert (batch.block_ids[pad] == -1).all() and (batch.example_weight[pad] == 0).all()
    assert batch.num_tokens == 8
    assert batch.loss_mask.dtype == torch.float32 and batch.example_weight.dtype == torch.float32

    fixed = pad_collate(seqs, seq_len=7)
    assert fixed.input_ids.shape == (2, 7) and fixed.num_tokens == 8


def test_pad_collate_too_long():
    seqs = [make_seq(3), make_seq(6)]
    with pytest.raises(ValueError, match="a sequence of length 6 does not fit seq_len=4"):
        pad_collate(seqs, seq_len=4)
    cut = pad_collate(seqs, seq_len=4, truncate=True)
    assert cut.input_ids[1].tolist() == seqs[1].input_ids[:4].tolist()
    assert cut.num_tokens == 7
    with pytest.raises(ValueError, match="empty list"):
        pad_collate([], seq_len=4)
    with pytest.raises(ValueError, match="seq_len must be a positive int or None, got 0"):
        pad_collate(seqs, seq_len=0)
