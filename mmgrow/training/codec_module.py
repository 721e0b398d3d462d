"""Train a learned codec (VQ video, audio, latent video ...) with the same ``mmgrow fit`` loop.

A recipe names the codec and a raw-media data module by ``class_path``::

    model:
      class_path: mmgrow.training.codec_module.CodecModule
      init_args:
        codec: {class_path: mmgrow.tokenizers.vq.VQVideoTokenizer, init_args: {...}}
    data:
      class_path: mmgrow.data.media_datamodule.MediaDataModule
      init_args: {modality: video, dataset: shapes}

The run directory is the usual one; its ``model.safetensors`` + ``model.yaml`` (``{"codec":
{"class_path", "init_args"}}``) are what ``codec.load_checkpoint`` reads, so a trained codec is used
by pointing a recipe's ``data.codec_args.<modality>.checkpoint`` at the run directory.

Validation logs the codec's own loss metrics (reconstruction, commitment, codebook perplexity and
usage ...) plus reconstruction metrics chosen by the codec's ``modality`` from
:data:`RECONSTRUCTIONS` (a codec may bring its own as a ``reconstruction`` attribute):

* video / image (``uint8 [..., H, W, 3]``): ``psnr`` and ``ssim`` on ``[0, 1]`` floats;
* audio (``float [B, N]``): ``snr_db``.

At the end of ``fit`` it writes ``samples/reconstruction.png``: originals above reconstructions of a
few validation items.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from mmgrow.checks import int_at_least
from mmgrow.rundir import CHECKPOINT_CONFIG_KEY
from mmgrow.tokenizers.learned import LearnedCodec
from mmgrow.training.module import adamw_warmup_cosine, check_optimizer_hparams

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Reconstruction metrics and pictures, per modality
# --------------------------------------------------------------------------------------------------


def as_unit_images(pixels: Tensor) -> Tensor:
    """``uint8 [..., H, W, 3]`` -> ``float32 [N, 3, H, W]`` in ``[0, 1]`` (every leading index one image)."""
    if pixels.dtype != torch.uint8 or pixels.dim() < 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels [..., H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    h, w = pixels.shape[-3:-1]
    return pixels.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float() / 255.0


def psnr(original: Tensor, reconstruction: Tensor) -> Tensor:
    """PSNR in dB of the whole batch on ``[0, 1]`` floats: ``10 log10(1 / mean((x - x_hat)^2))``.

    One mean squared error over every pixel of the batch (not a mean of per-frame PSNRs, which a
    single perfectly reconstructed frame would make infinite). torchmetrics' functional PSNR.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(as_unit_images(reconstruction), as_unit_images(original), data_range=1.0)


def ssim(original: Tensor, reconstruction: Tensor) -> Tensor:
    """Mean SSIM (Wang et al. 2004) over all frames and pixels of the batch: torchmetrics' functional
    SSIM with its defaults (11 x 11 Gaussian window, sigma 1.5, frames reflect-padded by 5 pixels, so
    frames need at least 6 pixels per side), ``C1 = 0.01^2``, ``C2 = 0.03^2`` on ``[0, 1]`` floats."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(as_unit_images(reconstruction), as_unit_images(original),
                                               data_range=1.0)


def pixel_metrics(original: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
    """``psnr`` and ``ssim`` of ``uint8 [..., H, W, 3]`` batches."""
    return {"psnr": psnr(original, reconstruction), "ssim": ssim(original, reconstruction)}


def snr_db(original: Tensor, reconstruction: Tensor) -> Tensor:
    """Mean over items of ``10 log10(sum x^2 / sum (x - x_hat)^2)`` for waveforms ``[B, N]``
    (torchmetrics' functional SNR, no mean removal)."""
    from torchmetrics.functional.audio import signal_noise_ratio

    return signal_noise_ratio(reconstruction.float(), original.float(), zero_mean=False).mean()


def waveform_metrics(original: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
    return {"snr_db": snr_db(original, reconstruction)}


def pixel_picture(original: Tensor, reconstruction: Tensor, path: Path) -> Path:
    """Frame grid PNG: for each item a row of original frames above a row of reconstructed ones."""
    from mmgrow.evaluation.media import frames_grid_png

    def frames(item: Tensor) -> Tensor:  # an image [H, W, 3] is a one-frame video
        return item.reshape(-1, *item.shape[-3:]).cpu()

    videos, captions = [], []
    for i in range(original.shape[0]):
        videos += [frames(original[i]), frames(reconstruction[i])]
        captions += [f"item {i} original", f"item {i} reconstruction"]
    scale = max(1, 96 // int(original.shape[-3]))  # small frames upscaled to about 96 px
    frames_grid_png(videos, captions, path, scale=scale)
    return path


def waveform_picture(original: Tensor, reconstruction: Tensor, path: Path, sample_rate: int | None = None,
                     zoom: int = 400) -> Path:
    """Matplotlib PNG, one column per item: original and reconstructed waveform (``zoom`` samples
    from the middle, where a tone's shape is visible) and their log-magnitude spectrograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmgrow.evaluation.media import atomic_write

    items = original.shape[0]
    fig, axes = plt.subplots(4, items, figsize=(3.2 * items, 8), squeeze=False)
    n = int(original.shape[-1])
    start = max(0, n // 2 - zoom // 2)
    window = slice(start, min(n, start + zoom))
    unit = "s" if sample_rate else "samples"
    rate = float(sample_rate or 1)
    for i in range(items):
        for row, (name, wave) in enumerate((("original", original[i]), ("reconstruction", reconstruction[i]))):
            wave = wave.detach().float().cpu()
            t = torch.arange(n, dtype=torch.float64)[window] / rate
            ax = axes[row, i]
            ax.plot(t.numpy(), wave[window].numpy(), lw=0.8)
            ax.set_ylim(-1.05, 1.05)
            ax.set_title(f"item {i} {name}", fontsize=8)
            ax.set_xlabel(unit, fontsize=7)
            spec = torch.stft(wave, n_fft=256, hop_length=64, window=torch.hann_window(256), return_complex=True)
            ax = axes[row + 2, i]
            ax.imshow((spec.abs() + 1e-6).log10().numpy(), origin="lower", aspect="auto",
                      extent=(0, n / rate, 0, rate / 2 if sample_rate else 0.5), vmin=-3, vmax=2)
            ax.set_title(f"item {i} {name} spectrogram", fontsize=8)
            ax.set_ylabel("Hz" if sample_rate else "cycles/sample", fontsize=7)
            ax.set_xlabel(unit, fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Reconstruction:
    """How reconstructions of one modality are scored and drawn.

    metrics: ``(original, reconstruction) -> {name: 0-d tensor}`` on batches of raw items.
    picture: ``(original, reconstruction, path, **hints) -> path``; ``hints`` holds ``sample_rate``
        when the codec or the training dataset has one.
    """

    metrics: Callable[[Tensor, Tensor], dict[str, Tensor]]
    picture: Callable[..., Path]


RECONSTRUCTIONS: dict[str, Reconstruction] = {
    "video": Reconstruction(pixel_metrics, pixel_picture),
    "image": Reconstruction(pixel_metrics, pixel_picture),
    "audio": Reconstruction(waveform_metrics, waveform_picture),
}
"""Modality -> reconstruction metrics and picture (a codec's ``reconstruction`` attribute overrides it)."""


def reconstruction_of(codec: LearnedCodec) -> Reconstruction | None:
    """The codec's own :class:`Reconstruction`, else its modality's, else None (loss metrics only)."""
    own = getattr(codec, "reconstruction", None)
    return own if isinstance(own, Reconstruction) else RECONSTRUCTIONS.get(codec.modality)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class CodecModule(pl.LightningModule):
    """Train a :class:`~mmgrow.tokenizers.learned.LearnedCodec` on batches of raw items.

    Args:
        codec: the codec to train (``class_path`` + ``init_args``). One given a ``checkpoint`` starts
            from those weights (unfrozen here: loading froze it).
        lr, weight_decay, betas: AdamW (no decay on 1-D parameters: norms and biases).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at
            ``trainer.max_steps`` (:func:`~mmgrow.training.module.warmup_cosine`).
        num_samples: validation items drawn in ``samples/reconstruction.png``.

    Batches are what :class:`~mmgrow.data.media_datamodule.MediaDataModule` yields: ``uint8 [B, F, H,
    W, 3]`` videos or ``float32 [B, N]`` waveforms. Throughput counts items: ``tokens_seen`` and
    ``last_step_tokens`` (read by :class:`~mmgrow.training.callbacks.RunSummary`) are numbers of
    raw items (videos, clips), so ``summary.json``'s ``tokens_per_s`` is items per second here.
    """

    def __init__(
        self,
        codec: LearnedCodec,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        num_samples: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(codec, LearnedCodec):
            raise TypeError(f"CodecModule needs a LearnedCodec (a codec with loss and reconstruct), got "
                            f"{type(codec).__name__}")
        int_at_least("CodecModule", "num_samples", num_samples, 0)
        check_optimizer_hparams("CodecModule", lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["codec"])
        if codec.frozen:  # load_checkpoint froze it; training it means fine-tuning those weights
            log.info("CodecModule: %s was loaded frozen; unfreezing it for training", type(codec).__name__)
            codec.unfreeze()
        self.model = codec
        self.reconstruction = reconstruction_of(codec)
        self._items_seen = torch.zeros((), dtype=torch.long)
        self.last_step_tokens = torch.zeros((), dtype=torch.long)  # items of the last training step
        self._preview: Tensor | None = None  # the first validation items, drawn at the end of fit

    def model_config(self) -> dict[str, Any]:
        """What ``model.yaml`` stores: the codec's ``class_path`` and constructor arguments."""
        return self.model.export_config()

    @property
    def tokens_seen(self) -> int:
        """Raw training items (videos, clips) this process has seen (kept across resumes)."""
        return int(self._items_seen)

    # ------------------------------------------------------------------ steps
    def _log_all(self, stage: str, loss: Tensor, metrics: dict[str, Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        kw = {"on_step": on_step, "on_epoch": not on_step, "batch_size": batch_size, "sync_dist": not on_step}
        self.log(f"{stage}/loss", loss, prog_bar=True, **kw)
        for name, value in metrics.items():
            if name != "loss":
                self.log(f"{stage}/{name}", torch.as_tensor(value, dtype=torch.float32), **kw)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, metrics = self.model.loss(batch)
        items = torch.tensor(batch.shape[0], device=batch.device)
        self.last_step_tokens = items
        self._items_seen = self._items_seen.to(batch.device) + items
        self._log_all("train", loss, metrics, batch.shape[0])
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, metrics = self.model.loss(batch)
        metrics = dict(metrics)
        if self.reconstruction is not None:
            metrics.update(self.reconstruction.metrics(batch, self.model.reconstruct(batch)))
        if batch_idx == 0 and self._preview is None and self.hparams.num_samples > 0:
            self._preview = batch[: self.hparams.num_samples].detach().cpu()
        self._log_all("val", loss, metrics, batch.shape[0])
        return loss

    # ------------------------------------------------------------------ evidence
    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            self.write_reconstructions(Path(self.trainer.default_root_dir) / "samples" / "reconstruction.png")

    @torch.no_grad()
    def write_reconstructions(self, path: Path) -> Path | None:
        """Draw the first validation items above their reconstructions; None when nothing to draw."""
        if self.reconstruction is None or self._preview is None:
            log.info("CodecModule: no %s picture (no validation batch seen or no picture for the modality)",
                     path.name)
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            original = self._preview
            rebuilt = self.model.reconstruct(original.to(self.device)).cpu()
        finally:
            self.model.train(was_training)
        return self.reconstruction.picture(original, rebuilt, path, **self._picture_hints())

    def _picture_hints(self) -> dict[str, Any]:
        """``sample_rate`` for audio axes: the codec's, else the training dataset's, when either has one."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        for owner in (self.model, getattr(data, "train_set", None)):
            rate = getattr(owner, "sample_rate", None)
            if isinstance(rate, int) and rate > 0:
                return {"sample_rate": rate}
        return {}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        if not decay and not no_decay:
            raise ValueError(f"CodecModule: {type(self.model).__name__} has no trainable parameters")
        return adamw_warmup_cosine(self, decay, no_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmgrow_tokens_seen"] = self.tokens_seen
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.model_config()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._items_seen = torch.tensor(int(checkpoint.get("mmgrow_tokens_seen", 0)))

