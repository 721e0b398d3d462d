"""``spectrogram``: a fixed (parameter-free) audio input codec, waveform -> normalised log-mel frames.

UnIVAL feeds audio to its encoder as mel spectrograms; here the codec turns a mono waveform
``x float [N]`` (in ``[-1, 1]``) into ``float32 [frames, bands]`` latents that the model projects, one
sequence position per frame (a continuous codec: ``latent_dim = bands``)::

    frames   = 1 + (N - n_fft) // hop                     (no centring, no padding: frame t reads
                                                           x[t*hop : t*hop + n_fft] and nothing else)
    X[t, k]  = sum_n w[n] x[t*hop + n] exp(-2 pi i k n / n_fft),   k = 0 .. n_fft/2
    w[n]     = 0.5 - 0.5 cos(2 pi n / n_fft)              (periodic Hann)
    P[t, k]  = (2 |X[t, k]| / sum_n w[n])^2               (a sinusoid of amplitude A centred on bin k
                                                           reads A^2 there)
    E[t, m]  = sum_k P[t, k] H[k, m]                      (triangular mel filterbank, below)
    z[t, m]  = 1 + 2 log(E[t, m] + eps) / (-log eps),     eps = 1e-6

**Normalisation.** The affine map is fixed, not fitted: silence (``E = 0``) maps to exactly ``-1`` and
an energy of 1 (a full-scale sinusoid in its band) to ``~+1``, so the codec is a pure function of one
clip (no per-clip or dataset statistics) and its outputs sit in about ``[-1, 1.1]`` for signals in
``[-1, 1]``.

**Filterbank.** HTK mel scale ``mel(f) = 2595 log10(1 + f / 700)``. ``bands + 2`` edge frequencies
``f_0 < f_1 < ... < f_{bands+1}`` are equally spaced in mel from ``fmin`` to ``fmax``; band ``m``
(``0 .. bands-1``) is the triangle rising from 0 at ``f_m`` to 1 at ``f_{m+1}`` and falling to 0 at
``f_{m+2}``, evaluated at the FFT bin frequencies ``k * sample_rate / n_fft`` (peak height 1, no area
normalisation). A band too narrow to cover any bin is a construction error (fewer bands or a larger
``n_fft``), never a silent all-zero channel.

Input-only: :meth:`SpectrogramCodec.decode` raises (the model reads audio here, it does not generate it).
Computed in float64, returned as float32.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.checks import finite_number, int_at_least, positive_int
from mmgrow.protocols import Tokenizer

EPS = 1e-6
"""Floor added to the mel energies before the log (silence -> ``log(EPS)`` -> ``-1`` after normalising)."""


def hz_to_mel(f: Tensor) -> Tensor:
    """HTK mel of frequencies ``f`` (Hz): ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    """Inverse of :func:`hz_to_mel`: ``700 (10^(m / 2595) - 1)``."""
    return 700.0 * (torch.pow(10.0, m / 2595.0) - 1.0)


def mel_edges(bands: int, fmin: float, fmax: float) -> Tensor:
    """``float64 [bands + 2]`` edge frequencies in Hz, equally spaced in mel from ``fmin`` to ``fmax``."""
    lo, hi = hz_to_mel(torch.tensor([fmin, fmax], dtype=torch.float64)).tolist()
    return mel_to_hz(torch.linspace(lo, hi, bands + 2, dtype=torch.float64))


def mel_filterbank(sample_rate: int, n_fft: int, bands: int, fmin: float, fmax: float) -> Tensor:
    """``float64 [n_fft // 2 + 1, bands]`` triangular filters ``H[k, m]`` (module docstring)."""
    edges = mel_edges(bands, fmin, fmax)
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft  # [K]
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]  # [bands] each
    rising = (freqs[:, None] - lo) / (mid - lo)
    falling = (hi - freqs[:, None]) / (hi - mid)
    return torch.minimum(rising, falling).clamp(min=0.0)


class SpectrogramCodec(Tokenizer):
    """Waveform ``float [N]`` -> normalised log-mel latents ``float32 [frames, bands]`` (module docstring).

    Args:
        sample_rate: samples per second of the waveforms it is given (the filterbank's frequency axis).
        n_fft: samples per frame (the FFT size); ``N >= n_fft``.
        hop: samples between frame starts.
        bands: mel bands, the latent width.
        fmin, fmax: frequency range of the filterbank in Hz; ``fmax=None`` = ``sample_rate / 2``.
        max_frames: the most frames one clip may give (its sequence length); None = no limit.
    """

    modality: ClassVar[str] = "audio"
    kind: ClassVar[str] = "continuous"

    def __init__(self, sample_rate: int = 8000, n_fft: int = 256, hop: int = 128, bands: int = 32,
                 fmin: float = 0.0, fmax: float | None = None, max_frames: int | None = None) -> None:
        super().__init__()
        self.sample_rate = positive_int("SpectrogramCodec", "sample_rate", sample_rate)
        self.n_fft = int_at_least("SpectrogramCodec", "n_fft", n_fft, 2)
        self.hop = positive_int("SpectrogramCodec", "hop", hop)
        self.bands = positive_int("SpectrogramCodec", "bands", bands)
        nyquist = sample_rate / 2
        self.fmin = finite_number("SpectrogramCodec", "fmin", fmin, low=0.0)
        self.fmax = nyquist if fmax is None else finite_number("SpectrogramCodec", "fmax", fmax)
        if not self.fmin < self.fmax <= nyquist:
            raise ValueError(f"SpectrogramCodec: expected 0 <= fmin < fmax <= sample_rate / 2 = {nyquist:g}, "
                             f"got fmin={fmin!r}, fmax={fmax!r}")
        self.max_frames = None if max_frames is None else positive_int("SpectrogramCodec", "max_frames", max_frames)
        self.latent_dim = self.bands
        self.special_tokens: dict[str, int] = {}

        fb = mel_filterbank(self.sample_rate, self.n_fft, self.bands, self.fmin, self.fmax)
        empty = (fb.amax(0) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"SpectrogramCodec: mel bands {empty} cover no FFT bin (bin spacing "
                             f"{sample_rate / n_fft:g} Hz is wider than those bands); use fewer bands than "
                             f"{bands} or a larger n_fft than {n_fft}")
        # Buffers, not parameters: nothing here is learned; non-persistent because they are a pure
        # function of the arguments (a checkpoint need not carry them).
        self.register_buffer("filterbank", fb, persistent=False)
        n = torch.arange(self.n_fft, dtype=torch.float64)
        self.register_buffer("window", 0.5 - 0.5 * torch.cos(2 * math.pi * n / self.n_fft), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """``1 + (N - n_fft) // hop`` frames of a clip of ``N >= n_fft`` samples."""
        return 1 + (num_samples - self.n_fft) // self.hop

    def encode(self, raw: Any) -> Tensor:
        """``raw float [N]`` waveform -> ``float32 [frames, bands]`` normalised log-mel frames."""
        x = torch.as_tensor(raw)
        if x.dim() != 1:
            raise ValueError(f"SpectrogramCodec.encode: expected a mono waveform float [N], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"SpectrogramCodec.encode: expected a float waveform in [-1, 1], got dtype {x.dtype}")
        if x.shape[0] < self.n_fft:
            raise ValueError(f"SpectrogramCodec.encode: a clip of {x.shape[0]} samples is shorter than one frame; "
                             f"expected at least n_fft={self.n_fft} samples")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("SpectrogramCodec.encode: the waveform has NaN or infinite samples")
        frames = self.num_frames(x.shape[0])
        if self.max_frames is not None and frames > self.max_frames:
            raise ValueError(f"SpectrogramCodec.encode: a clip of {x.shape[0]} samples gives {frames} frames, more "
                             f"than max_frames={self.max_frames}; use clips of at most "
                             f"{self.n_fft + (self.max_frames - 1) * self.hop} samples or raise max_frames")
        window = self.window.to(device=x.device)
        segments = x.to(torch.float64).unfold(0, self.n_fft, self.hop)  # [frames, n_fft]
        spectrum = torch.fft.rfft(segments * window, dim=-1)  # [frames, K]
        power = (2.0 * spectrum.abs() / window.sum()) ** 2
        energy = power @ self.filterbank.to(device=x.device)  # [frames, bands]
        return (1.0 + 2.0 * torch.log(energy + EPS) / -math.log(EPS)).to(torch.float32)

    def decode(self, tokens: Tensor) -> Any:
        raise NotImplementedError("SpectrogramCodec is an input-only codec: the model reads audio as log-mel frames "
                                  "but cannot generate audio through it (log-mel frames are not invertible here); "
                                  "use a discrete audio codec such as 'vq_audio' for audio targets")
