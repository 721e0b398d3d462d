"""Audio decoding: WAV with the standard library's ``wave``, other formats with PyAV; mono, resampled.

Every clip becomes ``float32 [N]`` in ``[-1, 1]``: channels averaged to mono, resampled to the
target rate by :func:`resample`, then cut or zero-padded to ``N = round(seconds * sample_rate)``.

Resampling method (:func:`resample`): band-limited Fourier resampling. The real FFT of the ``n``
input samples is truncated (downsampling: everything above the new Nyquist frequency is removed,
so nothing aliases) or zero-padded (upsampling) to ``m // 2 + 1`` bins and inverted to
``m`` samples (``m / n = rate_out / rate_in`` exactly, see :func:`resample`), scaled by ``m / n`` so amplitudes are kept; a
Nyquist bin that is split or cut is halved / doubled as usual. A sinusoid whose frequency lies
below both Nyquist frequencies keeps its frequency; the method treats the clip as periodic, so
the first and last few samples may ring when the clip's ends do not match.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmgrow.data.decode_video import import_av

AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus")


def resample(x: Tensor, rate_in: int, rate_out: int) -> Tensor:
    """``[n]`` samples at ``rate_in`` Hz -> ``[round(n * rate_out / rate_in)]`` at ``rate_out`` (see module doc).

    The input is first zero-padded to a multiple of ``rate_in / gcd(rate_in, rate_out)`` samples, so
    the transform length maps to a whole number of output samples and the output rate is exactly
    ``rate_out`` (an inexact length would stretch time, shifting every frequency); the padding's
    output is cut off again.
    """
    n = x.shape[-1]
    if rate_in == rate_out or n == 0:
        return x.clone()
    step = rate_in // math.gcd(rate_in, rate_out)
    padded = -(-n // step) * step
    m = padded * rate_out // rate_in
    spec = torch.fft.rfft(torch.nn.functional.pad(x.double(), (0, padded - n)))
    keep = min(spec.shape[-1], m // 2 + 1)
    out = torch.zeros(m // 2 + 1, dtype=spec.dtype)
    out[:keep] = spec[:keep]
    if m < padded and m % 2 == 0:
        out[m // 2] *= 2  # the new Nyquist bin folds the +- frequencies of a real signal (irfft keeps its real part)
    if m > padded and padded % 2 == 0:
        out[padded // 2] /= 2  # the old Nyquist bin is split between +- frequencies of the longer signal
    y = torch.fft.irfft(out, n=m) * (m / padded)
    return y[: max(1, round(n * rate_out / rate_in))].to(x.dtype)


def fit_length(x: Tensor, length: int) -> Tensor:
    """Cut ``x`` to ``length`` samples or pad it with zeros (silence) at the end."""
    if x.shape[-1] >= length:
        return x[:length]
    return torch.cat([x, x.new_zeros(length - x.shape[-1])])


def _wav_samples(path: Path) -> tuple[np.ndarray, int]:
    """``float64 [n]`` mono in [-1, 1] and the sample rate of a PCM WAV file."""
    with wave.open(str(path), "rb") as w:
        channels, width, rate, count = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(count)
    if count == 0 or not raw:
        raise ValueError("no audio frames")
    if width == 1:  # 8-bit WAV is unsigned
        pcm = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width in (2, 4):
        pcm = np.frombuffer(raw, f"<i{width}").astype(np.float64) / float(2 ** (8 * width - 1))
    elif width == 3:  # 24-bit: sign-extend three little-endian bytes
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        pcm = np.where(v >= 2 ** 23, v - 2 ** 24, v).astype(np.float64) / 2 ** 23
    else:
        raise ValueError(f"unsupported WAV sample width of {width} bytes")
    frames = len(pcm) // channels
    if frames == 0:
        raise ValueError("no complete audio frame")
    return pcm[: frames * channels].reshape(frames, channels).mean(axis=1), rate


def _av_samples(path: Path) -> tuple[np.ndarray, int]:
    av = import_av()
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.sample_rate)
        # Conversion to packed float mono at the native rate only; the rate change is resample()'s.
        converter = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = [f.to_ndarray().reshape(-1) for frame in container.decode(stream) for f in converter.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in converter.resample(None)]
    if not chunks or not sum(len(c) for c in chunks):
        raise ValueError("no audio frames")
    return np.concatenate(chunks).astype(np.float64), rate


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono ``float64`` samples and their rate (WAV via ``wave``, anything else via PyAV)."""
    return _wav_samples(path) if path.suffix.lower() == ".wav" else _av_samples(path)


def probe_audio(path: Path) -> None:
    """Raise when ``path`` holds no decodable audio (a WAV header with zero frames included)."""
    if path.suffix.lower() == ".wav":
        with wave.open(str(path), "rb") as w:
            if w.getnframes() == 0 or not w.readframes(1):
                raise ValueError("no audio frames")
            if w.getsampwidth() not in (1, 2, 3, 4):
                raise ValueError(f"unsupported WAV sample width of {w.getsampwidth()} bytes")
    else:
        read_audio(path)


def decode_audio(path: Path, sample_rate: int, seconds: float) -> Tensor:
    """``float32 [round(seconds * sample_rate)]`` in [-1, 1]: mono, resampled, cut or zero-padded."""
    samples, rate = read_audio(path)
    x = resample(torch.from_numpy(samples), rate, sample_rate)
    return fit_length(x, round(seconds * sample_rate)).clamp(-1.0, 1.0).float()
