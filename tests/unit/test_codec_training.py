"""Training learned codecs with `mmgrow fit`: CodecModule, MediaDataModule and the CLI's subclass mode.

Tiny codecs defined here (a per-pixel linear autoencoder, a framewise linear audio autoencoder)
stand in for the real ones, so these tests check the loop, not codec quality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mmgrow.data.media_datamodule import MediaDataModule
from mmgrow.tokenizers.learned import LearnedCodec
from mmgrow.training.cli import build_cli, model_class_path, rewrite_argv
from mmgrow.training.codec_module import CodecModule, psnr, snr_db, ssim

ROOT = Path(__file__).resolve().parents[2]
SHAPES_ARGS = {"frames": 2, "size": 16, "grid": 4}


class TinyVideoCodec(LearnedCodec):
    """``uint8 [B, F, H, W, 3]`` -> per-pixel ``3 -> hidden -> 3`` linear autoencoder on ``[0, 1]``."""

    modality = "video"
    kind = "continuous"
    raw_batch_dims = 4

    def __init__(self, hidden: int = 2, checkpoint: str | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.latent_dim = hidden
        self.encoder, self.decoder = nn.Linear(3, hidden), nn.Linear(hidden, 3)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    def _pixels(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.float() / 255.0
        return x, self.decoder(self.encoder(x))

    def loss(self, batch):
        x, y = self._pixels(batch)
        recon = ((y - x) ** 2).mean()
        return recon, {"recon": recon.detach(), "usage": torch.tensor(0.5)}

    @torch.no_grad()
    def reconstruct(self, batch):
        return (self._pixels(batch)[1].clamp(0, 1) * 255).round().to(torch.uint8)


class TinyAudioCodec(LearnedCodec):
    """``float [B, N]`` -> frames of ``frame`` samples through ``frame -> hidden -> frame`` linear maps."""

    modality = "audio"
    kind = "continuous"
    raw_batch_dims = 1

    def __init__(self, frame: int = 8, hidden: int = 4, sample_rate: int = 8000, checkpoint: str | None = None) -> None:
        super().__init__()
        self.frame, self.hidden, self.sample_rate = frame, hidden, sample_rate
        self.encoder, self.decoder = nn.Linear(frame, hidden), nn.Linear(hidden, frame)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    def _wave(self, batch):
        frames = batch.reshape(batch.shape[0], -1, self.frame)
        return self.decoder(self.encoder(frames)).reshape(batch.shape)

    def loss(self, batch):
        recon = ((self._wave(batch) - batch) ** 2).mean()
        return recon, {"recon": recon.detach()}

    @torch.no_grad()
    def reconstruct(self, batch):
        return self._wave(batch).clamp(-1, 1)


def _codec_recipe(tmp_path: Path, codec: str, init_args: dict, data: dict) -> Path:
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "val_check_interval": 3, "check_val_every_n_epoch": None,
                    "limit_val_batches": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
        "model": {"class_path": "mmgrow.training.codec_module.CodecModule",
                  "init_args": {"codec": {"class_path": f"{__name__}.{codec}", "init_args": init_args},
                                "lr": 0.05, "warmup_steps": 0, "num_samples": 2}},
        "data": {"class_path": "mmgrow.data.media_datamodule.MediaDataModule", "init_args": data},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module", autouse=True)
def _trust_this_module():
    """The recipes here name codecs defined in this test module: trust it (docs/training.md, 'Trust model')."""
    from mmgrow.trust import TRUST_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRUST_ENV, __name__)
        yield


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec_run")
    recipe = _codec_recipe(d, "TinyVideoCodec", {"hidden": 2}, {
        "modality": "video", "dataset": "shapes", "dataset_args": SHAPES_ARGS, "num_train": 64, "num_val": 8,
        "batch_size": 4})
    run = d / "run"
    # --data.num_train without init_args: overrides read the same as for MMGrowModule recipes
    cli = build_cli(["fit", "--config", str(recipe), "--data.num_train", "24", "--trainer.default_root_dir", str(run)])
    return run, cli


# --------------------------------------------------------------------------------------------------
# CodecModule
# --------------------------------------------------------------------------------------------------


def test_codec_recipe_runs_codec_module_on_raw_media(video_run):
    run, cli = video_run
    assert isinstance(cli.model, CodecModule) and isinstance(cli.model.model, TinyVideoCodec)
    assert isinstance(cli.datamodule, MediaDataModule) and cli.datamodule.hparams.num_train == 24
    for name in ("config.yaml", "model.safetensors", "model.yaml", "summary.json", "plots/loss.png",
                 "samples/reconstruction.png", "checkpoints/last.ckpt"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 3
    assert summary["tokens_seen"] == 3 * 4  # items: three steps of four videos
    assert summary["parameters"] == sum(p.numel() for p in cli.model.model.parameters())
    assert "mmgrow.training.codec_module.CodecModule" in (run / "config.yaml").read_text()


def test_exported_codec_loads_back_to_identical_outputs(video_run):
    run, cli = video_run
    stored = yaml.safe_load((run / "model.yaml").read_text())
    assert stored == {"codec": {"class_path": f"{__name__}.TinyVideoCodec", "init_args": {"hidden": 2}}}
    trained = cli.model.model.eval()
    loaded = TinyVideoCodec(hidden=2, checkpoint=str(run))
    assert loaded.frozen and not any(p.requires_grad for p in loaded.parameters())
    batch = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(loaded._pixels(batch)[1], trained._pixels(batch)[1])
    assert torch.equal(loaded.reconstruct(batch), trained.reconstruct(batch))
    fresh = TinyVideoCodec(hidden=2)  # not trained: it must differ, or the comparison above proves nothing
    assert not torch.equal(fresh.reconstruct(batch), trained.reconstruct(batch))


def test_saved_config_and_checkpoint_replay_the_validation(video_run, tmp_path):
    run, _ = video_run
    replay = build_cli(["validate", "--config", str(run / "config.yaml"), "--ckpt_path",
                        str(run / "checkpoints" / "last.ckpt"), "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(replay.model, CodecModule) and isinstance(replay.model.model, TinyVideoCodec)
    logged = json.loads((run / "summary.json").read_text())["metrics"]
    assert float(replay.trainer.callback_metrics["val/psnr"]) == pytest.approx(logged["val/psnr"], rel=1e-6)


def _ssim_reference(x: torch.Tensor, y: torch.Tensor, kernel: int = 11, sigma: float = 1.5) -> float:
    """Float64 SSIM (Wang et al. 2004) of ``[N, C, H, W]`` images in [0, 1]: Gaussian-window means,
    variances (clamped at 0) and covariance of the images reflect-padded by ``kernel // 2``,
    ``C1 = 0.01^2``, ``C2 = 0.03^2``, mean over every pixel of every image."""
    pad = kernel // 2
    x, y = (torch.nn.functional.pad(v.double(), (pad,) * 4, mode="reflect") for v in (x, y))
    t = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, kernel, kernel)

    def blur(v):
        return torch.nn.functional.conv2d(v, window, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy = ((blur(v * v) - m**2).clamp(min=0) for v, m in ((x, mx), (y, my)))
    cxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def test_logged_psnr_and_ssim_are_those_of_the_final_reconstructions(video_run):
    run, cli = video_run
    batch = next(iter(cli.datamodule.val_dataloader()))  # limit_val_batches=1: the batch validated last
    rebuilt = TinyVideoCodec(hidden=2, checkpoint=str(run)).reconstruct(batch)
    x = batch.double() / 255
    y = rebuilt.double() / 255
    want_psnr = 10 * math.log10(1.0 / float(((x - y) ** 2).mean()))
    to_images = lambda v: v.reshape(-1, 16, 16, 3).permute(0, 3, 1, 2)
    want_ssim = _ssim_reference(to_images(x), to_images(y))
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    assert metrics["val/psnr"] == pytest.approx(want_psnr, rel=1e-5)
    assert metrics["val/ssim"] == pytest.approx(want_ssim, abs=1e-5)
    assert float(psnr(batch, rebuilt)) == pytest.approx(want_psnr, rel=1e-5)
    assert float(ssim(batch, rebuilt)) == pytest.approx(want_ssim, abs=1e-5)
    with torch.no_grad():
        loss, codec_metrics = TinyVideoCodec(hidden=2, checkpoint=str(run)).loss(batch)
    assert metrics["val/loss"] == pytest.approx(float(loss), rel=1e-5)
    assert metrics["val/usage"] == pytest.approx(float(codec_metrics["usage"]))  # the codec's own metrics too


def test_snr_db_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 64, generator=g) * 2 - 1
    y = x + 0.1 * torch.randn(3, 64, generator=g)
    x64, y64 = x.double(), y.double()
    want = (10 * torch.log10((x64**2).sum(-1) / ((x64 - y64) ** 2).sum(-1))).mean()
    assert float(snr_db(x, y)) == pytest.approx(float(want), rel=1e-5)


def test_audio_codec_fit_logs_snr_and_draws_waveforms(tmp_path):
    recipe = _codec_recipe(tmp_path, "TinyAudioCodec", {"frame": 8, "hidden": 4}, {
        "modality": "audio", "dataset": "tones", "dataset_args": {"seconds": 0.05}, "num_train": 16, "num_val": 4,
        "batch_size": 4})
    run = tmp_path / "run"
    cli = build_cli(["fit", "--config", str(recipe), "--trainer.default_root_dir", str(run)])
    batch = next(iter(cli.datamodule.val_dataloader()))
    assert batch.dtype == torch.float32 and batch.shape == (4, 400)
    rebuilt = cli.model.model.reconstruct(batch).double()
    x = batch.double()
    want = (10 * torch.log10((x**2).sum(-1) / ((x - rebuilt) ** 2).sum(-1))).mean()
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    assert metrics["val/snr_db"] == pytest.approx(float(want), rel=1e-4)
    assert "val/psnr" not in metrics  # pixel metrics belong to pixel codecs
    assert (run / "samples" / "reconstruction.png").stat().st_size > 0


def test_codec_module_refuses_a_codec_that_cannot_learn():
    from mmgrow.tokenizers.pixels import PixelTokenizer

    with pytest.raises(TypeError, match="LearnedCodec.*PixelTokenizer"):
        CodecModule(PixelTokenizer(grid=4))


def test_a_loaded_frozen_codec_is_unfrozen_for_fine_tuning(video_run):
    run, _ = video_run
    module = CodecModule(TinyVideoCodec(hidden=2, checkpoint=str(run)))
    assert not module.model.frozen
    assert all(p.requires_grad for p in module.model.parameters())
    module.train()
    assert module.model.training


def test_shipped_latent_video_weights_reconstruct_heldout_shapes():
    """pretrained/latent_video_shapes (trained by recipes/codecs/latent_video.yaml) loads with the
    recipe's codec arguments and reconstructs 8 held-out clips above 30 dB PSNR (measured: 37.9 dB)
    with latents of about unit scale (measured std 0.98)."""
    from mmgrow.data.synthetic.shapes import ShapesDataset
    from mmgrow.tokenizers.latent import LatentVideoCodec

    recipe = yaml.safe_load((ROOT / "recipes/codecs/latent_video.yaml").read_text())
    args = recipe["model"]["init_args"]["codec"]["init_args"]
    codec = LatentVideoCodec(**args, checkpoint=str(ROOT / "pretrained/latent_video_shapes"))
    clips = ShapesDataset(num_samples=8, seed=0, split="heldout", frames=4, size=32, grid=8)
    video = torch.stack([clips[i].media["video"] for i in range(8)])
    assert float(psnr(video, codec.reconstruct(video))) > 30.0
    latents = torch.cat([codec.encode(v) for v in video])
    assert 0.7 < float(latents.std()) < 1.3 and abs(float(latents.mean())) < 0.2


# --------------------------------------------------------------------------------------------------
# MediaDataModule
# --------------------------------------------------------------------------------------------------


def _batches(dm: MediaDataModule, n: int) -> list[torch.Tensor]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_video_batches_have_the_documented_shape_and_are_seeded():
    dm = MediaDataModule(modality="video", dataset="shapes", dataset_args=SHAPES_ARGS, num_train=16, num_val=8,
                         batch_size=4, seed=3)
    first = _batches(dm, 2)
    assert first[0].dtype == torch.uint8 and first[0].shape == (4, 2, 16, 16, 3)
    again = _batches(MediaDataModule(modality="video", dataset="shapes", dataset_args=SHAPES_ARGS, num_train=16,
                                     num_val=8, batch_size=4, seed=3), 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = _batches(MediaDataModule(modality="video", dataset="shapes", dataset_args=SHAPES_ARGS, num_train=16,
                                     num_val=8, batch_size=4, seed=4), 2)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # shuffled: the batches are items of the training split, not the first ones in order
    ordered = torch.stack([dm.train_set[i].media["video"] for i in range(4)])
    assert not torch.equal(first[0], ordered)
    val = next(iter(dm.val_dataloader()))  # validation keeps the split's order
    assert torch.equal(val, torch.stack([dm.val_set[i].media["video"] for i in range(4)]))


def test_audio_batches_are_float_waveforms():
    dm = MediaDataModule(modality="audio", dataset="tones", dataset_args={"seconds": 0.1}, num_train=8, num_val=4,
                         batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.float32 and batch.shape == (4, 800)
    assert float(batch.abs().max()) <= 1.0


def test_media_datamodule_names_a_missing_modality():
    with pytest.raises(KeyError, match=r"no 'audio'.*\['video'\]|\['video'\].*no 'audio'"):
        MediaDataModule(modality="audio", dataset="shapes", dataset_args=SHAPES_ARGS, num_train=4, num_val=4)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        MediaDataModule(dataset="nope")


# --------------------------------------------------------------------------------------------------
# CLI dispatch
# --------------------------------------------------------------------------------------------------


def test_model_class_path_is_read_from_configs_and_options(tmp_path):
    recipe = _codec_recipe(tmp_path, "TinyVideoCodec", {}, {})
    argv = rewrite_argv(["fit", "--config", str(recipe)])
    assert model_class_path(argv) == "mmgrow.training.codec_module.CodecModule"
    assert model_class_path(rewrite_argv(["fit", "--config", str(ROOT / "recipes/quickstart.yaml")])) is None
    assert model_class_path(["fit", "--model.class_path", "a.B"]) == "a.B"
    assert model_class_path(["fit", "--model=a.C"]) == "a.C"
    assert model_class_path(["fit", "--model", "{class_path: a.D, init_args: {x: 1}}"]) == "a.D"


def test_recipe_without_class_path_still_builds_mmgrow_module():
    from mmgrow.data.datamodule import MMDataModule
    from mmgrow.training.module import MMGrowModule

    cli = build_cli(["--config", str(ROOT / "recipes/quickstart.yaml"), "--model.dim", "32", "--model.depth", "1",
                     "--data.num_train", "8", "--data.num_val", "4"], run=False)
    assert type(cli.model) is MMGrowModule and type(cli.datamodule) is MMDataModule
    assert cli.model.vocab == cli.datamodule.vocab  # the data -> model links still apply
    assert cli.model.continuous == cli.datamodule.continuous


def test_continuous_codec_widths_are_linked_into_mmgrow_module(fake_dist):
    from mmgrow import registry
    from mmgrow.training.module import MMGrowModule

    # a continuous video codec under a test-only name (whatever names the shipped codecs get)
    fake_dist.add_distribution("codec-under-test", "1.0",
                               {"mmgrow.tokenizers": {"tiny_latent_test": f"{__name__}:TinyVideoCodec"}})
    registry.discover(refresh=True)
    cli = build_cli(["--config", str(ROOT / "recipes/quickstart.yaml"), "--model.dim", "32", "--model.depth", "1",
                     "--data.codecs", "{text: bytes, video: tiny_latent_test}", "--data.codec_args", "{video: {hidden: 3}}",
                     "--data.num_train", "8", "--data.num_val", "4"], run=False)
    assert type(cli.model) is MMGrowModule
    assert cli.datamodule.continuous == {"video": 3}
    assert cli.model.continuous == {"video": 3}
