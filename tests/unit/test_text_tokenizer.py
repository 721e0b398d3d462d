"""ByteTokenizer: ids are UTF-8 bytes plus declared specials; round trip; clear errors."""

import pytest
import torch

import mmgrow
from mmgrow.tokenizers.text import ByteTokenizer


@pytest.fixture
def tok():
    return ByteTokenizer()


def test_registered_and_declares_its_specials(tok):
    created = mmgrow.create("tokenizers", "bytes")
    assert isinstance(created, ByteTokenizer)
    assert tok.modality == "text" and tok.kind == "discrete"
    assert {"bos", "eos", "pad"} <= set(tok.special_tokens)
    specials = sorted(tok.special_tokens.values())
    # specials sit right after the 256 byte values, distinct, and fill the vocabulary exactly
    assert specials == list(range(256, 256 + len(specials)))
    assert tok.vocab_size == 256 + len(tok.special_tokens)


@pytest.mark.parametrize("text", ["", "a red square moves left", "héllo wörld ✓ 🎥", "tab\tnew\nline"])
def test_encode_is_utf8_bytes_with_bos_eos(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1
    expected = [tok.special_tokens["bos"], *text.encode("utf-8"), tok.special_tokens["eos"]]
    assert ids.tolist() == expected
    assert tok.decode(ids) == text


def test_bos_eos_optional(tok):
    assert tok.encode("ab", add_bos=False, add_eos=False).tolist() == [97, 98]
    assert tok.encode("ab", add_bos=False).tolist() == [97, 98, tok.special_tokens["eos"]]
    assert tok.encode("ab", add_eos=False).tolist() == [tok.special_tokens["bos"], 97, 98]


def test_decode_drops_specials_and_replaces_invalid_utf8(tok):
    pad = tok.special_tokens["pad"]
    assert tok.decode([pad, 104, tok.special_tokens["eos"], 105, pad]) == "hi"
    cut = list("é".encode())[:1]  # half of a two-byte character
    assert tok.decode(cut + [33]) == "\ufffd!"


def test_bad_inputs_raise_clear_errors(tok):
    with pytest.raises(TypeError, match="expects a str, got bytes"):
        tok.encode(b"abc")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 259\)"):
        tok.decode([1, 300])
    with pytest.raises(ValueError, match=r"ids must lie in"):
        tok.decode(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer ids, got dtype torch.float32"):
        tok.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"1-D tensor of ids \[N\], got shape \(1, 2\)"):
        tok.decode(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="1-D int tensor or a list of ints, got str"):
        tok.decode("abc")


def test_generation_prefix_and_length(tok):
    assert tok.generation_prefix().tolist() == [tok.bos_id]
    sampled = torch.tensor([104, 105, tok.eos_id, 33, tok.eos_id])
    assert tok.generation_length(sampled) == 3
    assert tok.generation_length(torch.tensor([104, 105])) == 2
    assert tok.decode(sampled[: tok.generation_length(sampled)]) == "hi"
