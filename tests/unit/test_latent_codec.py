"""LatentVideoCodec and patchify: patch layout vs a loop reference, exact inverse, normalisation
statistics equations, round trips, a short training on moving shapes, checkpoints, bad input."""

import pytest
import torch

from mmgrow.data.synthetic.shapes import ShapesDataset
from mmgrow.rundir import CheckpointError, save_model
from mmgrow.tokenizers.latent import STD_FLOOR, LatentVideoCodec
from mmgrow.tokenizers.patchify import patchify, unpatchify

SMALL = {"frame_size": 16, "levels": 1, "hidden": 8, "latent_channels": 3, "patch": 2}


def small_codec(**kw) -> LatentVideoCodec:
    torch.manual_seed(0)
    return LatentVideoCodec(**{**SMALL, **kw}).eval()


def random_video(frames=3, size=16, seed=0):
    return torch.randint(0, 256, (frames, size, size, 3), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


@pytest.fixture
def one_thread():
    """Small convolutions gain nothing from threads; oversubscribed threads on a busy 2-core
    machine make a training loop many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# patchify
# --------------------------------------------------------------------------------------------------


def test_patchify_layout_matches_a_loop_reference():
    f, c, h, w, p = 2, 3, 4, 6, 2
    x = torch.randn(f, c, h, w, dtype=torch.float64)
    out = patchify(x, p)
    assert out.shape == (f * (h // p) * (w // p), c * p * p)
    for t in range(f):
        for i in range(h // p):
            for j in range(w // p):
                row = (t * (h // p) + i) * (w // p) + j
                for ch in range(c):
                    for u in range(p):
                        for v in range(p):
                            assert out[row, (ch * p + u) * p + v] == x[t, ch, i * p + u, j * p + v]


def test_unpatchify_is_the_exact_inverse_with_and_without_batch_dims():
    x = torch.randn(2, 5, 4, 8, 6)  # [B, F, C, h, w]
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 5 * 4 * 3, 16)
    assert torch.equal(unpatchify(tokens, 2, 4, 8, 6), x)
    assert torch.equal(tokens[1], patchify(x[1], 2))
    t = torch.randn(12, 4 * 9)
    assert torch.equal(patchify(unpatchify(t, 3, 4, 6, 6), 3), t)


def test_patchify_errors():
    with pytest.raises(ValueError, match="not divisible by patch size 3"):
        patchify(torch.zeros(1, 2, 4, 6), 3)
    with pytest.raises(ValueError, match=r"\[\.\.\., F, C, h, w\]"):
        patchify(torch.zeros(4, 6, 2), 2)
    with pytest.raises(ValueError, match="unpatchify"):
        unpatchify(torch.zeros(5, 16), 2, 4, 4, 4)  # 5 patches are not whole 4-patch frames


# --------------------------------------------------------------------------------------------------
# codec
# --------------------------------------------------------------------------------------------------


def test_default_sizes_for_the_shapes_dataset():
    c = LatentVideoCodec()
    assert c.modality == "video" and c.kind == "continuous" and c.learned and c.raw_batch_dims == 4
    assert c.latent_size == 8 and c.latent_dim == 16 and c.latents_per_frame == 16
    assert c.num_latents(6) == 96
    latents = c.encode(torch.zeros(6, 32, 32, 3, dtype=torch.uint8))
    assert latents.shape == (96, 16) and latents.dtype == torch.float32
    assert torch.equal(c.block_ids(latents), torch.zeros(96, dtype=torch.long))


def test_encode_normalises_and_patchifies_the_encoder_output():
    c = small_codec().double()
    c.latent_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    c.latent_var.copy_(torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64))
    video = random_video(frames=2)
    latents = c.encode(video)
    with torch.no_grad():
        z = c.autoencoder.encode(((video.double() / 127.5 - 1).permute(0, 3, 1, 2))[None])[0]  # [F, C, 8, 8]
    std = torch.sqrt(c.latent_var + STD_FLOOR)
    for t in range(2):
        for i in range(4):
            for j in range(4):
                for ch in range(3):
                    for u in range(2):
                        for v in range(2):
                            expected = (z[t, ch, 2 * i + u, 2 * j + v] - c.latent_mean[ch]) / std[ch]
                            got = latents[(t * 4 + i) * 4 + j, (ch * 2 + u) * 2 + v]
                            assert abs(float(got) - float(expected)) < 1e-6  # float32 output


def test_decode_inverts_the_normalisation():
    c = small_codec().double()
    c.latent_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    c.latent_var.copy_(torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64))
    video = random_video(frames=3)
    frames = c.decode(c.encode(video).double())
    assert frames.dtype == torch.uint8 and frames.shape == (3, 16, 16, 3)
    direct = c.reconstruct(video[None])[0]
    diff = (frames.int() - direct.int()).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99  # rounding at .5 only
    with pytest.raises(ValueError, match=r"\[F' \* 16, 12\]"):
        c.decode(torch.zeros(10, 12))
    with pytest.raises(ValueError, match=r"\[F' \* 16, 12\]"):
        c.decode(torch.zeros(16, 8))
    with pytest.raises(TypeError, match="float tensor"):
        c.decode(torch.zeros(16, 12, dtype=torch.long))
    assert c.decode(torch.zeros(0, 12)).shape == (0, 16, 16, 3)


def test_running_statistics_follow_the_update_rule():
    c = small_codec(stats_momentum=0.3).double()
    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(3, dtype=torch.float64)
    var = torch.ones(3, dtype=torch.float64)
    for step in range(5):
        z = 2.0 * torch.randn(2, 3, 3, 4, 4, generator=g, dtype=torch.float64) + step  # [B, F', C, h, w]
        c._update_statistics(z)
        flat = z.transpose(0, 2).reshape(3, -1)
        a = max(0.3, 1.0 / (step + 1))  # 1, 1/2, 1/3, then the momentum
        mean = (1 - a) * mean + a * flat.mean(-1)
        var = (1 - a) * var + a * flat.var(-1, unbiased=False)
        torch.testing.assert_close(c.latent_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c.latent_var, var, rtol=1e-12, atol=1e-12)
    assert int(c.stats_steps) == 5


def test_statistics_change_only_in_training_mode():
    c = small_codec()
    batch = random_video(frames=2)[None]
    loss, metrics = c.loss(batch)
    assert sorted(metrics) == ["latent_l2", "latent_std", "recon"] and loss.requires_grad
    assert int(c.stats_steps) == 0 and torch.equal(c.latent_var, torch.ones(3))
    c.train()
    c.loss(batch)
    assert int(c.stats_steps) == 1 and not torch.equal(c.latent_var, torch.ones(3))


def test_temporal_downsampling_and_bad_input():
    c = small_codec(temporal_downsample=True)
    assert c.num_latents(4) == 2 * 16 and c.encode(random_video(frames=4)).shape == (32, 12)
    assert c.decode(c.encode(random_video(frames=4))).shape == (4, 16, 16, 3)
    with pytest.raises(ValueError, match="even frame count"):
        c.encode(random_video(frames=3))
    with pytest.raises(ValueError, match="even frame count"):
        c.num_latents(5)
    for channels in (1, 4):
        with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
            c.encode(torch.zeros(2, 16, 16, channels, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected 16x16"):
        c.encode(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="times patch 4"):
        LatentVideoCodec(frame_size=24, levels=2, patch=4)
    with pytest.raises(ValueError, match="not divisible by 4"):
        LatentVideoCodec(frame_size=18, levels=2, patch=1)


def test_short_training_lowers_error_and_normalises_latents(one_thread):
    """100 Adam steps (lr 3e-3, 2 clips x 4 frames of 32x32 shapes, hidden 16): held-out reconstruction
    MSE (in [-1, 1] units) falls at least 5x and below 3/4 of an all-black reconstruction's error; the
    running statistics (momentum 0.1) then give the training latents per-channel |mean| < 0.3 and std
    in [0.75, 1.25] (EMAs over a still-moving encoder, hence the band; measured: |mean| <= 0.16,
    std 0.87 .. 0.92)."""
    torch.manual_seed(0)
    codec = LatentVideoCodec(frame_size=32, levels=2, hidden=16).train()
    ds = ShapesDataset(num_samples=40, frames=4, size=32, grid=8, seed=0)
    clips = torch.stack([ds[i].media["video"] for i in range(40)])
    train, held = clips[:32], clips[32:]

    def mse(a, b):
        return float(((a.float() / 127.5 - b.float() / 127.5) ** 2).mean())

    before = mse(codec.reconstruct(held), held)
    optimiser = torch.optim.Adam(codec.parameters(), lr=3e-3)
    for idx in torch.randint(0, 32, (100, 2), generator=torch.Generator().manual_seed(0)):
        loss, _ = codec.loss(train[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    codec.eval()
    after = mse(codec.reconstruct(held), held)
    black = mse(torch.zeros_like(held), held)
    latents = torch.cat([codec.encode(clip) for clip in train])  # [N, C*p*p]
    per_channel = latents.reshape(-1, 4, 4).transpose(0, 1).reshape(4, -1)
    mean, std = per_channel.mean(-1), per_channel.std(-1)
    print(f"held-out mse {before:.4f} -> {after:.4f} (all-black {black:.4f}); latent mean {mean.tolist()} "
          f"std {std.tolist()}")
    assert after < before / 5 and after < 0.75 * black
    assert float(mean.abs().max()) < 0.3
    assert 0.75 < float(std.min()) and float(std.max()) < 1.25


def test_checkpoint_round_trip_keeps_the_statistics(tmp_path):
    c = small_codec()
    c.train()
    c.loss(random_video(frames=2)[None])
    c.eval()
    save_model(c, c.export_config(), tmp_path / "run")
    torch.manual_seed(7)
    loaded = LatentVideoCodec(**SMALL, checkpoint=str(tmp_path / "run"))
    assert torch.equal(loaded.latent_mean, c.latent_mean) and torch.equal(loaded.latent_var, c.latent_var)
    video = random_video(frames=2, seed=3)
    assert torch.equal(loaded.encode(video), c.encode(video))
    assert torch.equal(loaded.decode(c.encode(video)), c.decode(c.encode(video)))
    loaded.train()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    loaded.unfreeze().train()
    assert loaded.training and all(p.requires_grad for p in loaded.parameters())
    with pytest.raises(CheckpointError, match="latent_channels"):
        LatentVideoCodec(**{**SMALL, "latent_channels": 4}, checkpoint=str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="VQVideoTokenizer"):
        from mmgrow.tokenizers.vq import VQVideoTokenizer

        vq = VQVideoTokenizer(frame_size=16, levels=1, hidden=8, num_codes=4, code_dim=3)
        save_model(vq, vq.export_config(), tmp_path / "vq")
        LatentVideoCodec(**SMALL, checkpoint=str(tmp_path / "vq"))
