"""``spectrogram`` codec: filterbank and frames against float64 references written here independently
(per-element Python math, an explicit DFT instead of torch.fft), frame count, locality (no centring,
no per-clip statistics), a sine lights its own band, and named errors."""

import math

import pytest
import torch

from mmgrow import registry
from mmgrow.data.synthetic.tones import ToneDataset
from mmgrow.testing.conformance import run_checks
from mmgrow.tokenizers.spectrogram import SpectrogramCodec

SR, N_FFT, HOP, BANDS = 8000, 256, 128, 32


def reference_filterbank(sr, n_fft, bands, fmin, fmax):
    """``[n_fft // 2 + 1][bands]`` nested lists, one element at a time."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    lo_mel, hi_mel = mel(fmin), mel(fmax)
    edges = [hz(lo_mel + (hi_mel - lo_mel) * i / (bands + 1)) for i in range(bands + 2)]
    out = []
    for k in range(n_fft // 2 + 1):
        f = k * sr / n_fft
        row = []
        for m in range(bands):
            a, b, c = edges[m], edges[m + 1], edges[m + 2]
            if a < f <= b:
                row.append((f - a) / (b - a))
            elif b < f < c:
                row.append((c - f) / (c - b))
            else:
                row.append(0.0)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64), edges


def reference_log_mel(x, sr=SR, n_fft=N_FFT, hop=HOP, bands=BANDS, fmin=0.0, fmax=SR / 2):
    """float64 ``[frames, bands]`` with an explicit DFT (cos / sin sums)."""
    x = x.to(torch.float64)
    fb, _ = reference_filterbank(sr, n_fft, bands, fmin, fmax)
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    window = torch.tensor([0.5 - 0.5 * math.cos(2 * math.pi * i / n_fft) for i in range(n_fft)], dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft
    rows = []
    for t in range((x.shape[0] - n_fft) // hop + 1):
        seg = x[t * hop: t * hop + n_fft] * window
        re, im = (torch.cos(angle) * seg).sum(1), -(torch.sin(angle) * seg).sum(1)
        power = 4 * (re ** 2 + im ** 2) / window.sum() ** 2
        rows.append(1 + 2 * torch.log(power @ fb + 1e-6) / -math.log(1e-6))
    return torch.stack(rows)


@pytest.mark.parametrize("kw", [{}, {"sample_rate": 16000, "n_fft": 512, "bands": 40, "fmin": 50.0, "fmax": 6000.0}])
def test_filterbank_matches_float64_reference(kw):
    codec = SpectrogramCodec(**kw)
    args = {"sample_rate": SR, "n_fft": N_FFT, "bands": BANDS, "fmin": 0.0, "fmax": None} | kw
    args["fmax"] = args["fmax"] or args["sample_rate"] / 2
    ref, _ = reference_filterbank(args["sample_rate"], args["n_fft"], args["bands"], args["fmin"], args["fmax"])
    assert codec.filterbank.dtype == torch.float64 and codec.filterbank.shape == ref.shape
    torch.testing.assert_close(codec.filterbank, ref, rtol=0, atol=1e-12)
    assert float(ref.max()) <= 1.0 and bool((ref.amax(0) > 0).all())


def test_frames_match_float64_reference_on_tones():
    codec = SpectrogramCodec()
    ds = ToneDataset(num_samples=3, seconds=0.25, seed=2)
    for i in range(len(ds)):
        audio = ds[i].media["audio"]
        got = codec.encode(audio)
        assert got.dtype == torch.float32 and got.shape == (codec.num_frames(audio.shape[0]), BANDS)
        torch.testing.assert_close(got.double(), reference_log_mel(audio), rtol=0, atol=2e-6)


def test_silence_is_minus_one_and_a_full_scale_bin_centred_sine_is_about_plus_one():
    codec = SpectrogramCodec()
    assert bool((codec.encode(torch.zeros(N_FFT)) == -1).all())
    # 1000 Hz = bin 32 exactly: P = 1 at that bin, and a band peaking near it reads ~log(1) -> ~+1
    x = torch.sin(2 * math.pi * 1000 * torch.arange(2048, dtype=torch.float64) / SR)
    assert abs(float(codec.encode(x).max()) - 1.0) < 0.05


@pytest.mark.parametrize("n, frames", [(256, 1), (383, 1), (384, 2), (4000, 30)])
def test_frame_count(n, frames):
    codec = SpectrogramCodec()
    assert codec.num_frames(n) == frames and codec.encode(torch.zeros(n)).shape == (frames, BANDS)


def test_pure_function_of_each_frame_window_and_deterministic():
    codec = SpectrogramCodec()
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = codec.encode(x)
    assert torch.equal(a, codec.encode(x.clone())) and torch.equal(a, SpectrogramCodec().encode(x))
    # frame 3 reads x[384:640] only: changing everything else (and the clip's loudness statistics) leaves it alone
    y = x.clone()
    y[:384] = 0.9
    y[640:] = -0.9
    b = codec.encode(y)
    assert torch.equal(a[3], b[3]) and not torch.equal(a[2], b[2]) and not torch.equal(a[4], b[4])


def test_sine_peaks_in_the_band_containing_its_frequency():
    codec = SpectrogramCodec()
    _, edges = reference_filterbank(SR, N_FFT, BANDS, 0.0, SR / 2)
    t = torch.arange(4000, dtype=torch.float64) / SR
    for m in (6, 12, 20, 28):  # at a band's centre frequency: that band wins
        peak = codec.encode(0.8 * torch.sin(2 * math.pi * edges[m + 1] * t)).mean(0).argmax()
        assert int(peak) == m, (m, edges[m + 1])
    for f in (300.0, 440.0, 880.0, 1234.5, 2500.0, 3500.0):  # anywhere: one of the two bands whose triangle holds f
        peak = int(codec.encode(0.8 * torch.sin(2 * math.pi * f * t)).mean(0).argmax())
        assert edges[peak] < f < edges[peak + 2], (f, peak, edges[peak], edges[peak + 2])


def test_bad_inputs_are_named_errors():
    codec = SpectrogramCodec(max_frames=4)
    with pytest.raises(ValueError, match=r"mono waveform float \[N\], got shape \(2, 300\)"):
        codec.encode(torch.zeros(2, 300))
    with pytest.raises(TypeError, match="float waveform"):
        codec.encode(torch.zeros(300, dtype=torch.int16))
    with pytest.raises(ValueError, match="255 samples is shorter than one frame; expected at least n_fft=256"):
        codec.encode(torch.zeros(255))
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(300)
        x[7] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            codec.encode(x)
    with pytest.raises(ValueError, match="gives 5 frames, more than max_frames=4; use clips of at most 640"):
        codec.encode(torch.zeros(640 + HOP))
    assert codec.encode(torch.zeros(640)).shape == (4, BANDS)
    with pytest.raises(NotImplementedError, match="input-only codec"):
        codec.decode(torch.zeros(4, BANDS))


@pytest.mark.parametrize("kw, message", [
    ({"fmax": 5000.0}, r"fmin < fmax <= sample_rate / 2 = 4000"),
    ({"fmin": 2000.0, "fmax": 2000.0}, "fmin < fmax"),
    ({"n_fft": 64, "bands": 64}, r"mel bands \[0, 1, .*cover no FFT bin"),
    ({"hop": 0}, "hop must be a positive int"),
    ({"n_fft": 1}, "n_fft must be an int >= 2"),
    ({"max_frames": 0}, "max_frames must be a positive int"),
])
def test_bad_arguments_are_named_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        SpectrogramCodec(**kw)


def test_registered_continuous_audio_codec_passes_conformance():
    cls = registry.load_plugin("tokenizers", "spectrogram")
    assert cls is SpectrogramCodec
    codec = cls(bands=24)
    assert (codec.modality, codec.kind, codec.latent_dim, codec.vocab_size) == ("audio", "continuous", 24, 0)
    assert not list(codec.parameters()) and not codec.state_dict()
    assert all(r.passed for r in run_checks("tokenizers", cls)), run_checks("tokenizers", cls)
