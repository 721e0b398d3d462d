"""ToneDataset: determinism, value range, held-out combinations, and captions that match the sound.

The sound is checked with measurements written independently of the generator: pitch from the
zero-crossing rate (every waveform crosses zero twice per period), waveform from its crest factor
and largest step, glides from crossings early vs late, beeps from runs of loud 8 ms frames.
"""

import math

import pytest
import torch

from mmgrow.data.synthetic.tones import HELDOUT_COMBOS, PATTERNS, PITCHES, WAVEFORMS, ToneDataset

SR = 8000


def crossings(x: torch.Tensor) -> int:
    """Sign changes, ignoring exact zeros (silence)."""
    s = torch.sign(x[x != 0])
    return int((s[1:] != s[:-1]).sum())


def sounding_runs(x: torch.Tensor, amplitude: float, frame: int = 64) -> int:
    """Number of runs of frames whose peak exceeds 5 % of the amplitude."""
    n = x.shape[0] // frame * frame
    loud = x[:n].abs().reshape(-1, frame).amax(1) > 0.05 * amplitude
    return int(loud[0]) + int((loud[1:] & ~loud[:-1]).sum())


def test_deterministic_and_random_access():
    a = ToneDataset(num_samples=12, seed=3)
    b = ToneDataset(num_samples=12, seed=3)
    later_first = [b[i] for i in reversed(range(12))][::-1]
    for x, y in zip([a[i] for i in range(12)], later_first):
        assert x.text == y.text and x.meta == y.meta and torch.equal(x.media["audio"], y.media["audio"])
    assert a[-1].text == a[11].text
    other_seed = ToneDataset(num_samples=12, seed=4)
    val = ToneDataset(num_samples=12, seed=3, split="val")
    assert any(not torch.equal(a[i].media["audio"], other_seed[i].media["audio"]) for i in range(12))
    assert any(not torch.equal(a[i].media["audio"], val[i].media["audio"]) for i in range(12))
    with pytest.raises(IndexError, match="index 12 out of range for 12 samples"):
        a[12]


@pytest.mark.parametrize("seconds,sample_rate", [(0.5, 8000), (0.128, 16000)])
def test_shape_dtype_and_value_range(seconds, sample_rate):
    ds = ToneDataset(num_samples=40, seconds=seconds, sample_rate=sample_rate, seed=1)
    for i in range(len(ds)):
        s = ds[i]
        audio, amp = s.media["audio"], s.meta["amplitude"]
        assert audio.dtype == torch.float32 and audio.shape == (round(seconds * sample_rate),)
        assert 0.5 <= amp <= 0.9
        peak = float(audio.abs().max())
        assert peak <= amp + 1e-6 <= 1.0
        # the envelope reaches 1 and every waveform peaks at +-1 within a period (sampled: >= cos(pi f/sr))
        assert peak >= 0.75 * amp
        assert audio[0] == 0 or abs(float(audio[0])) < 0.2 * amp, "onsets fade in"


def test_heldout_combinations_never_in_train_or_val_but_their_parts_are():
    heldout = set(HELDOUT_COMBOS)
    seen = set()
    for split in ("train", "val"):
        ds = ToneDataset(num_samples=300, seconds=0.05, seed=0, split=split)
        for i in range(len(ds)):
            m = ds[i].meta
            seen.add((m["pitch"], m["waveform"], m["pattern"]))
    assert not seen & heldout
    for axis in range(3):
        assert {c[axis] for c in heldout} <= {c[axis] for c in seen}
    assert len(seen) == len(PITCHES) * len(WAVEFORMS) * len(PATTERNS) - len(heldout)

    ds = ToneDataset(num_samples=2 * len(HELDOUT_COMBOS), seconds=0.05, split="heldout")
    got = [(ds[i].meta["pitch"], ds[i].meta["waveform"], ds[i].meta["pattern"]) for i in range(len(ds))]
    assert set(got) == heldout
    assert [p[1] for p in ds.heldout_prompts()] == [dict(zip(("pitch", "waveform", "pattern"), c))
                                                   for c in HELDOUT_COMBOS]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_caption_names_the_attributes_the_audio_has(split):
    ds = ToneDataset(num_samples=48, seed=2, split=split)
    n = ds.length
    for i in range(len(ds)):
        s = ds[i]
        x, m = s.media["audio"].double(), s.meta
        pitch, waveform, pattern, amp = m["pitch"], m["waveform"], m["pattern"], m["amplitude"]
        words = {"steady": "held steady", "rising": "rising", "falling": "falling"}
        expected_tail = f", {['two', 'three'][m['beeps'] - 2]} beeps" if pattern == "beeps" else f" {words[pattern]}"
        assert s.text == f"a {pitch} {waveform} tone{expected_tail}"
        assert (m["beeps"] in (2, 3)) == (pattern == "beeps")

        # pitch: the detuned centre lies within 2 semitones of the named class
        assert abs(12 * math.log2(m["frequency"] / PITCHES[pitch])) <= 2 + 1e-9
        if pattern == "steady":
            measured = crossings(x) / 2 / (n / SR)
            assert measured == pytest.approx(m["frequency"], rel=0.03)
        if pattern in ("rising", "falling"):
            early, late = crossings(x[: n // 3]), crossings(x[-(n // 3):])
            ratio = late / early if pattern == "rising" else early / late
            assert ratio > 1.4, (s.text, early, late)  # a one-octave glide: ~2^(2/3) between the thirds
        if pattern == "beeps":
            assert sounding_runs(x, amp) == m["beeps"], s.text
        else:
            assert sounding_runs(x, amp) == 1, s.text

        # waveform: crest factor and the largest step between samples, inside the fully-on middle
        if pattern != "beeps":
            mid = x[n // 4: 3 * n // 4]
            rms, biggest_step = float(mid.pow(2).mean().sqrt()), float(mid.diff().abs().max())
            if waveform == "square":
                assert torch.allclose(mid.abs(), torch.full_like(mid, amp), atol=1e-6)
            elif waveform == "sine":
                assert rms == pytest.approx(amp / math.sqrt(2), rel=0.03)
            elif waveform == "triangle":
                assert rms == pytest.approx(amp / math.sqrt(3), rel=0.03) and biggest_step < 0.9 * amp
            else:  # sawtooth: same rms as a triangle, but it jumps from +amp to -amp once a period
                assert rms == pytest.approx(amp / math.sqrt(3), rel=0.03) and biggest_step > 1.5 * amp


def test_restricted_names_and_bad_arguments():
    ds = ToneDataset(num_samples=30, seconds=0.05, pitches=["low", "high"], waveforms=["sine", "square"],
                     patterns=["steady", "rising"], heldout=[["low", "sine", "rising"]])
    metas = [ds[i].meta for i in range(30)]
    assert {m["pitch"] for m in metas} <= {"low", "high"} and {m["waveform"] for m in metas} <= {"sine", "square"}
    assert ("low", "sine", "rising") not in {(m["pitch"], m["waveform"], m["pattern"]) for m in metas}
    with pytest.raises(ValueError, match=r"pitches must be distinct names from the valid ones: low, mid, high"):
        ToneDataset(pitches=["shrill"])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        ToneDataset(split="test")
    with pytest.raises(ValueError, match="above the Nyquist frequency 1000 Hz"):
        ToneDataset(sample_rate=2000)
    with pytest.raises(ValueError, match="would never appear in training"):
        ToneDataset(pitches=["low"], waveforms=["sine"], patterns=["steady"], heldout=[["low", "sine", "steady"]])
    with pytest.raises(ValueError, match="split='heldout' but no held-out combination"):
        ToneDataset(pitches=["high"], waveforms=["sine"], split="heldout")
