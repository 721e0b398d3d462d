"""Learned audio codec: waveform -> strided convolutions -> vector quantiser -> transposed convolutions.

A mono waveform ``float [N]`` in ``[-1, 1]`` becomes ``N / S`` codes, one per ``S = prod(strides)``
samples (a SoundStream / EnCodec-style codec at toy scale, with a single codebook)::

    x [B, 1, N] --Conv1d 7--> [B, c, N] --(residual unit, act, Conv1d 2s / stride s) per stride-->
        [B, c * 2^L, N / S] --Conv1d 3--> z [B, N / S, code_dim] --VectorQuantizer--> q
    q --Conv1d 7--> [B, c * 2^L, N / S] --(act, ConvTranspose1d 2s / stride s, residual unit)
        per stride, reversed--> [B, c, N] --Conv1d 7--> x^ [B, N]

Training loss (:meth:`VQAudioTokenizer.loss`)::

    L = l1_weight * mean|x - x^| + stft_weight * L_stft(x^, x) + L_vq

with the multi-resolution STFT loss :func:`multi_resolution_stft_loss` (linear and log magnitudes at
several FFT sizes) and the quantiser's commitment loss ``L_vq``.

Token layout of one item (like LWM's vision segments, with audio's own begin / end tokens)::

    [boa] code_0 code_1 ... code_{N/S - 1} eoa

Ids: codes ``0..K-1``, then ``boa = K``, ``eoa = K+1``; ``vocab_size = K + 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgrow.protocols import length_through_first
from mmgrow.tokenizers.learned import LearnedCodec
from mmgrow.tokenizers.vector_quantizer import VectorQuantizer

SPECIALS: tuple[str, ...] = ("boa", "eoa")
"""Special tokens, in id order after the codes."""

DEAD_CODE_SHARE = 0.03
"""A code is restarted when its EMA usage falls below this fraction of the uniform share ``1 / K``
(relative, because a fixed threshold such as 1e-3 would restart every code once ``K >= 1000``)."""


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def stft_magnitude(x: Tensor, n_fft: int, eps: float = 1e-5) -> Tensor:
    """``x [B, N]`` -> ``[B, n_fft // 2 + 1, frames]`` magnitudes ``sqrt(Re^2 + Im^2 + eps)``.

    Periodic Hann window of ``n_fft`` samples, hop ``n_fft // 4``, frames centred on ``t * hop`` with
    reflect padding of ``n_fft // 2`` at both ends (``torch.stft(center=True)``). ``eps`` keeps the
    gradient of the square root finite at zero and floors the log magnitude at ``log(eps) / 2``."""
    if x.shape[-1] <= n_fft // 2:
        raise ValueError(f"stft_magnitude: a signal of {x.shape[-1]} samples is too short for n_fft={n_fft}; "
                         f"expected more than {n_fft // 2} samples (reflect padding)")
    window = torch.hann_window(n_fft, dtype=x.dtype, device=x.device)
    spec = torch.stft(x, n_fft, hop_length=n_fft // 4, win_length=n_fft, window=window, center=True,
                      pad_mode="reflect", return_complex=True)
    power = torch.view_as_real(spec).pow(2).sum(-1)
    return torch.sqrt(power + eps)


def multi_resolution_stft_loss(pred: Tensor, target: Tensor, fft_sizes: Sequence[int], eps: float = 1e-5) -> Tensor:
    """Mean over FFT sizes ``n`` of ``mean|M_n(pred) - M_n(target)| + mean|log M_n(pred) - log M_n(target)|``.

    ``pred``, ``target``: ``[B, N]``; ``M_n`` is :func:`stft_magnitude`. The linear term weighs the loud
    partials, the log term the quiet ones (silences, harmonics); several sizes trade time against
    frequency resolution, so neither smeared onsets nor detuned partials are free."""
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"multi_resolution_stft_loss: expected pred and target of the same shape [B, N], got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if not fft_sizes:
        raise ValueError("multi_resolution_stft_loss: fft_sizes is empty; expected at least one FFT size")
    total = pred.new_zeros(())
    for n_fft in fft_sizes:
        mag_pred, mag_target = stft_magnitude(pred, n_fft, eps), stft_magnitude(target, n_fft, eps)
        total = total + (mag_pred - mag_target).abs().mean() + (mag_pred.log() - mag_target.log()).abs().mean()
    return total / len(fft_sizes)


def snr_db(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over items of ``10 log10(sum_t target^2 / sum_t (target - pred)^2)``; ``[B, N]`` -> 0-d."""
    signal = target.pow(2).sum(-1)
    noise = (target - pred).pow(2).sum(-1)
    return (10 * torch.log10((signal + 1e-12) / (noise + 1e-12))).mean()


# --------------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------------


class ResidualUnit(nn.Module):
    """``x + Conv1d_1(act(Conv1d_3,dilated(act(x))))`` at constant length and width ``[B, C, T]``."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(F.elu(self.conv(F.elu(x))))


def down_conv(c_in: int, c_out: int, stride: int) -> nn.Conv1d:
    """Kernel ``2s``, stride ``s``, padding ``ceil(s / 2)``: ``T -> T / s`` exactly when ``s`` divides ``T``."""
    return nn.Conv1d(c_in, c_out, 2 * stride, stride=stride, padding=(stride + 1) // 2)


def up_conv(c_in: int, c_out: int, stride: int) -> nn.ConvTranspose1d:
    """The inverse length map of :func:`down_conv`: ``T -> T * s``
    (``(T - 1) s - 2p + 2s + output_padding`` with ``output_padding = 2p - s``)."""
    pad = (stride + 1) // 2
    return nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=pad, output_padding=2 * pad - stride)


class AudioEncoder(nn.Module):
    """``[B, 1, N]`` -> ``[B, code_dim, N / prod(strides)]``; width doubles at every stride."""

    def __init__(self, channels: int, strides: Sequence[int], code_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, channels, 7, padding=3)]
        width = channels
        for s in strides:
            layers += [ResidualUnit(width), nn.ELU(), down_conv(width, 2 * width, s)]
            width *= 2
        layers += [nn.ELU(), nn.Conv1d(width, code_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AudioDecoder(nn.Module):
    """``[B, code_dim, T]`` -> ``[B, 1, T * prod(strides)]``, the mirror of :class:`AudioEncoder`."""

    def __init__(self, channels: int, strides: Sequence[int], code_dim: int) -> None:
        super().__init__()
        width = channels * 2 ** len(strides)
        layers: list[nn.Module] = [nn.Conv1d(code_dim, width, 7, padding=3)]
        for s in reversed(strides):
            layers += [nn.ELU(), up_conv(width, width // 2, s), ResidualUnit(width // 2)]
            width //= 2
        layers += [nn.ELU(), nn.Conv1d(width, 1, 7, padding=3)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


# --------------------------------------------------------------------------------------------------
# the codec
# --------------------------------------------------------------------------------------------------


class VQAudioTokenizer(LearnedCodec):
    """Waveform ``float [N]`` <-> ``[N / S + 2]`` int64 tokens (layout in the module doc), ``S = prod(strides)``.

    Args:
        num_codes: codebook size ``K``.
        code_dim: width of a code.
        channels: width of the first convolution; it doubles after every stride.
        strides: downsampling factors; their product ``S`` is the number of samples per token
            (default 32: 250 tokens per second at 8 kHz).
        beta: commitment weight of the quantiser.
        ema_decay: EMA decay of the codebook (None: codebook learned by gradients).
        fft_sizes: FFT sizes of the multi-resolution STFT loss (hop = size / 4).
        l1_weight, stft_weight: weights of the waveform L1 and STFT terms of the loss. The STFT term
            is phase-blind and its linear magnitudes are large (they grow with the FFT size); at weight 1
            it dominated and training settled on phase-incoherent output (waveform SNR about 0 dB after
            600 steps on tones, against 5 dB at weight 0.1 for the same final STFT loss), hence 0.1.
        checkpoint: a codec run directory or ``model.safetensors``; loads it frozen.
    """

    modality: ClassVar[str] = "audio"
    kind: ClassVar[str] = "discrete"
    raw_batch_dims: ClassVar[int] = 1

    def __init__(
        self,
        num_codes: int = 512,
        code_dim: int = 16,
        channels: int = 32,
        strides: Sequence[int] = (2, 4, 4),
        beta: float = 0.25,
        ema_decay: float | None = 0.99,
        fft_sizes: Sequence[int] = (128, 256, 512),
        l1_weight: float = 1.0,
        stft_weight: float = 0.1,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_codes", num_codes), ("code_dim", code_dim), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VQAudioTokenizer: {name} must be a positive int, got {value!r}")
        self.strides = _positive_ints("strides", strides)
        self.fft_sizes = _positive_ints("fft_sizes", fft_sizes)
        if min(l1_weight, stft_weight) < 0:
            raise ValueError(f"VQAudioTokenizer: loss weights must be >= 0, got l1_weight={l1_weight}, "
                             f"stft_weight={stft_weight}")
        self.num_codes, self.code_dim, self.channels = num_codes, code_dim, channels
        self.beta, self.ema_decay = beta, ema_decay
        self.l1_weight, self.stft_weight = l1_weight, stft_weight
        self.checkpoint = checkpoint

        self.encoder = AudioEncoder(channels, self.strides, code_dim)
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta=beta, ema_decay=ema_decay,
                                         dead_code_threshold=DEAD_CODE_SHARE / num_codes)
        self.decoder = AudioDecoder(channels, self.strides, code_dim)
        self.special_tokens: dict[str, int] = {name: num_codes + i for i, name in enumerate(SPECIALS)}
        self.vocab_size = num_codes + len(SPECIALS)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    # ---------------------------------------------------------------------------------------------
    # sizes
    # ---------------------------------------------------------------------------------------------

    @property
    def hop(self) -> int:
        """Samples per token, ``S = prod(strides)``."""
        return math.prod(self.strides)

    def num_tokens(self, num_samples: int) -> int:
        """Length of an encoded item of ``num_samples`` samples: ``1 + N / S + 1``."""
        self._check_length(num_samples, "num_tokens")
        return num_samples // self.hop + 2

    # ---------------------------------------------------------------------------------------------
    # network passes
    # ---------------------------------------------------------------------------------------------

    def latents(self, audio: Tensor) -> Tensor:
        """``[B, N]`` (``N`` a multiple of ``S``, unchecked) -> encoder outputs ``z [B, N / S, code_dim]``
        before quantisation."""
        param = self.encoder.net[0].weight
        return self.encoder(audio.to(param.device, param.dtype)[:, None]).transpose(1, 2)

    def synthesize(self, codes_or_latents: Tensor) -> Tensor:
        """Codes ``[B, T]`` int64 (or quantised latents ``[B, T, code_dim]``) -> waveform ``[B, T * S]``
        (unclipped: the loss sees the raw output)."""
        q = codes_or_latents
        if not q.is_floating_point():
            q = self.quantizer.lookup(q.to(self.quantizer.codebook.device))
        return self.decoder(q.transpose(1, 2))[:, 0]

    def codes(self, audio: Tensor) -> Tensor:
        """``[B, N]`` -> nearest codes ``[B, N / S]`` int64 (no codebook statistics change)."""
        z = self.latents(audio)
        return self.quantizer.nearest(z.reshape(-1, self.code_dim)).reshape(z.shape[:2])

    # ---------------------------------------------------------------------------------------------
    # LearnedCodec
    # ---------------------------------------------------------------------------------------------

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch [B, N]`` float in ``[-1, 1]`` -> (loss, metrics); equation in the module doc.

        Metrics (detached, 0-d): ``recon`` (mean ``|x - x^|``), ``stft``, ``vq``, ``perplexity``,
        ``usage`` (fraction of codes used in the batch) and ``snr_db`` (:func:`snr_db`)."""
        x = self._check_batch(batch, "loss")
        param = self.encoder.net[0].weight
        x = x.to(param.device, param.dtype)
        out = self.quantizer(self.latents(x))
        pred = self.synthesize(out.quantized)
        recon = (pred - x).abs().mean()
        stft = multi_resolution_stft_loss(pred, x, self.fft_sizes)
        loss = self.l1_weight * recon + self.stft_weight * stft + out.loss
        metrics = {"recon": recon, "stft": stft, "vq": out.loss, "perplexity": out.perplexity, "usage": out.usage,
                   "snr_db": snr_db(pred, x)}
        return loss, {k: v.detach() for k, v in metrics.items()}

    @torch.no_grad()
    def reconstruct(self, batch: Tensor) -> Tensor:
        """``[B, N]`` -> ``[B, N]``: decode of the nearest codes, clipped to ``[-1, 1]``, in ``batch``'s
        dtype and device."""
        x = self._check_batch(batch, "reconstruct")
        return self.synthesize(self.codes(x)).clamp(-1.0, 1.0).to(batch.device, batch.dtype)

    # ---------------------------------------------------------------------------------------------
    # Tokenizer
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, audio: Any) -> Tensor:
        """``float [N]`` (``N`` a multiple of ``S``) -> ``[1 + N / S + 1]`` int64 on the CPU: ``boa``, the codes,
        ``eoa``."""
        x = self._check_item(audio)
        codes = self.codes(x[None])[0].cpu()
        return torch.cat([torch.tensor([self.special_tokens["boa"]]), codes, torch.tensor([self.special_tokens["eoa"]])])

    @torch.no_grad()
    def decode(self, tokens: Tensor | Sequence[int]) -> Tensor:
        """``[M]`` tokens -> waveform ``float32 [n * S]`` on the CPU, clipped to ``[-1, 1]``.

        Robust to sampled output: a leading ``boa`` is optional, decoding stops at the first ``eoa``,
        and ids that are not codes (a stray ``boa``, out-of-range ids) are dropped, so ``n`` is the
        number of code ids kept. No codes -> an empty waveform."""
        ids = _token_ids(tokens)
        boa, eoa = (self.special_tokens[n] for n in SPECIALS)
        if ids.numel() and int(ids[0]) == boa:
            ids = ids[1:]
        stop = (ids == eoa).nonzero()
        if stop.numel():
            ids = ids[: int(stop[0])]
        ids = ids[(ids >= 0) & (ids < self.num_codes)]
        if not ids.numel():
            return torch.zeros(0, dtype=torch.float32)
        return self.synthesize(ids[None])[0].clamp(-1.0, 1.0).to("cpu", torch.float32)

    def generation_prefix(self) -> Tensor:
        """A generated item starts after ``boa``."""
        return torch.tensor([self.special_tokens["boa"]], dtype=torch.long)

    def generation_length(self, tokens: Tensor) -> int:
        """Sampled audio ends at (and includes) the first ``eoa``."""
        return length_through_first(tokens, self.special_tokens["eoa"])

    def generation_constraint(self, num_samples: int) -> Callable[[int], Tensor]:
        """Allowed next ids while generating ``num_samples`` samples after ``boa``: ``allowed(k) -> bool
        [vocab_size]``, codes for steps ``k < N / S``, only ``eoa`` at step ``N / S``."""
        self._check_length(num_samples, "generation_constraint")
        length = num_samples // self.hop
        codes = torch.zeros(self.vocab_size, dtype=torch.bool)
        codes[: self.num_codes] = True
        only_eoa = torch.zeros(self.vocab_size, dtype=torch.bool)
        only_eoa[self.special_tokens["eoa"]] = True

        def allowed(step: int) -> Tensor:
            if not 0 <= step <= length:
                raise IndexError(f"generation step {step} is outside a {num_samples}-sample item "
                                 f"(steps 0..{length} after boa)")
            return (codes if step < length else only_eoa).clone()

        return allowed

    # ---------------------------------------------------------------------------------------------
    # validation
    # ---------------------------------------------------------------------------------------------

    def _check_length(self, num_samples: int, where: str) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"VQAudioTokenizer.{where}: expected a positive number of samples, got {num_samples!r}")
        if num_samples % self.hop:
            below, above = num_samples // self.hop * self.hop, (num_samples // self.hop + 1) * self.hop
            raise ValueError(f"VQAudioTokenizer.{where}: {num_samples} samples is not a multiple of the hop "
                             f"{self.hop} (= prod(strides) {self.strides}); expected a length such as {below or above} "
                             f"or {above}")

    def _check_item(self, audio: Any) -> Tensor:
        if not isinstance(audio, Tensor):
            if type(audio).__module__ == "numpy":
                audio = torch.from_numpy(audio)
            else:
                raise TypeError(f"VQAudioTokenizer expects a float tensor [N], got {type(audio).__name__}")
        if audio.dim() != 1:
            raise ValueError(f"VQAudioTokenizer.encode expects one mono waveform [N], got shape {tuple(audio.shape)}")
        if not audio.is_floating_point():
            raise TypeError(f"VQAudioTokenizer expects float samples in [-1, 1], got dtype {audio.dtype}")
        self._check_length(int(audio.shape[0]), "encode")
        return audio

    def _check_batch(self, batch: Any, where: str) -> Tensor:
        if not isinstance(batch, Tensor) or batch.dim() != 2:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(f"VQAudioTokenizer.{where} expects a batch of waveforms [B, N], got {shape}")
        if not batch.is_floating_point():
            raise TypeError(f"VQAudioTokenizer.{where} expects float samples in [-1, 1], got dtype {batch.dtype}")
        self._check_length(int(batch.shape[1]), where)
        return batch


def _positive_ints(what: str, values: Sequence[int]) -> list[int]:
    """A non-empty sequence of positive ints -> a list (lists survive YAML; tuples do not)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"VQAudioTokenizer: {what} must be a non-empty list of positive ints, got {values!r}")
    return [int(v) for v in values]


def _token_ids(tokens: Any) -> Tensor:
    """A 1-D int tensor or list of ints -> ``[M]`` int64 on the CPU, with a named error otherwise."""
    if isinstance(tokens, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in tokens):
            raise TypeError("VQAudioTokenizer.decode: expected a sequence of ints")
        return torch.tensor(tokens, dtype=torch.long)
    if not isinstance(tokens, Tensor):
        raise TypeError(f"VQAudioTokenizer.decode: expected a 1-D int tensor or a list of ints, got "
                        f"{type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"VQAudioTokenizer.decode: expected a 1-D tensor of tokens [M], got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"VQAudioTokenizer.decode: expected integer tokens, got dtype {tokens.dtype}")
    return tokens.long().cpu()
