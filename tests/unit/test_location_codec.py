"""``locations`` codec: quantisation round trip within half a bin, exact bin values, ids, errors."""

import math

import numpy as np
import pytest
import torch

from mmgrow.registry import load_plugin
from mmgrow.testing.conformance import run_checks
from mmgrow.tokenizers.locations import LocationTokenizer


@pytest.mark.parametrize("num_bins", [2, 7, 1000])
def test_round_trip_within_half_a_bin(num_bins):
    codec = LocationTokenizer(num_bins=num_bins)
    g = torch.Generator().manual_seed(num_bins)
    for _ in range(2000):
        a, b = torch.rand(2, 2, generator=g, dtype=torch.float64)
        box = torch.stack([a.min(), b.min(), a.max(), b.max()])
        ids = codec.encode(box)
        assert ids.dtype == torch.long and ids.shape == (4,)
        assert int(ids.min()) >= 0 and int(ids.max()) < num_bins
        back = codec.decode(ids)
        assert back.dtype == torch.float32
        # half a bin width, plus float32 rounding of the decoded value
        assert float((back.double() - box).abs().max()) <= 0.5 / (num_bins - 1) + 1e-7


def test_ids_are_the_documented_rounding():
    codec = LocationTokenizer(num_bins=11)  # bins at 0, 0.1, ..., 1
    assert codec.encode([0.0, 0.04, 0.06, 1.0]).tolist() == [0, 0, 1, 10]
    assert codec.encode((0.33, 0.349, 0.351, 0.99)).tolist() == [3, 3, 4, 10]
    assert codec.decode(torch.tensor([0, 3, 4, 10])).tolist() == pytest.approx([0.0, 0.3, 0.4, 1.0], abs=1e-7)
    assert codec.encode(np.array([0.25, 0.25, 0.625, 0.625])).tolist() == [2, 2, 6, 6]  # 2.5 -> 2, 6.25 -> 6


def test_bins_decode_exactly_and_encode_back():
    codec = LocationTokenizer(num_bins=1000)
    ids = torch.arange(1000)
    for quad in ids.reshape(250, 4):
        quad = quad.sort().values
        assert torch.equal(codec.encode(codec.decode(quad)), quad)
    assert codec.vocab_size == 1000 and codec.special_tokens == {}
    assert codec.modality == "location" and codec.kind == "discrete"
    assert codec.generation_length(torch.arange(9)) == 4 and codec.generation_length(torch.arange(3)) == 3
    assert codec.generation_prefix().numel() == 0


@pytest.mark.parametrize("box, match", [
    ([0.1, 0.2, 0.3], "4 numbers"),
    ([[0.1, 0.2], [0.3, 0.4]], "4 numbers"),
    ([0.1, 0.2, 0.3, 1.5], r"in \[0, 1\]"),
    ([-0.1, 0.2, 0.3, 0.4], r"in \[0, 1\]"),
    ([0.1, math.nan, 0.3, 0.4], "finite"),
    ([0.5, 0.2, 0.3, 0.4], "x0 <= x1"),
    ([0.1, 0.5, 0.3, 0.4], "y0 <= y1"),
])
def test_bad_boxes_are_named(box, match):
    with pytest.raises(ValueError, match=match):
        LocationTokenizer().encode(box)


def test_bad_types_and_ids():
    codec = LocationTokenizer(num_bins=10)
    with pytest.raises(TypeError, match="string"):
        codec.encode("0 0 1 1")
    with pytest.raises(TypeError, match="numbers"):
        codec.encode([0.1, "a", 0.2, 0.3])
    with pytest.raises(ValueError, match=r"outside the bins \[0, 10\)"):
        codec.decode(torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="4 integer ids"):
        codec.decode(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_bins must be an int >= 2"):
        LocationTokenizer(num_bins=1)


def test_registered_and_conformant():
    cls = load_plugin("tokenizers", "locations")
    assert cls is LocationTokenizer
    results = run_checks("tokenizers", cls)
    assert {r.name for r in results} >= {"tokenizer_attributes", "tokenizer_round_trip"}
    assert all(r.passed for r in results), [r for r in results if not r.passed]
