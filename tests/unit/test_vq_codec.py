"""VQVideoTokenizer: LWM layout and blocks, codes vs a float64 nearest-code reference, decode
robustness, temporal downsampling, a short training on moving shapes, checkpoints, bad input."""

import pytest
import torch

from mmgrow.data.synthetic.shapes import ShapesDataset
from mmgrow.protocols import NO_BLOCK
from mmgrow.rundir import CheckpointError, save_model
from mmgrow.tokenizers.conv_autoencoder import unit_to_video
from mmgrow.tokenizers.vq import VQVideoTokenizer

SMALL = {"frame_size": 16, "levels": 2, "hidden": 8, "num_codes": 16, "code_dim": 4}


def small_codec(**kw) -> VQVideoTokenizer:
    torch.manual_seed(0)
    return VQVideoTokenizer(**{**SMALL, **kw}).eval()


def random_video(frames=3, size=16, seed=0):
    return torch.randint(0, 256, (frames, size, size, 3), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_ids_special_tokens_and_sizes():
    c = small_codec()
    assert c.modality == "video" and c.kind == "discrete" and c.learned and c.raw_batch_dims == 4
    assert c.special_tokens == {"bov": 16, "eof": 17, "eov": 18} and c.vocab_size == 19
    assert c.latent_size == 4 and c.codes_per_frame == 16 and c.tokens_per_frame == 17
    assert c.num_tokens(3) == 1 + 3 * 17


def test_layout_and_block_ids():
    c = small_codec()
    tokens = c.encode(random_video(frames=3))
    codes = c.quantize(random_video(frames=3))  # [3, 4, 4]
    expected = [16]
    for f in range(3):
        expected += codes[f].flatten().tolist() + [17 if f < 2 else 18]
    assert tokens.dtype == torch.int64 and tokens.tolist() == expected
    assert len(tokens) == c.num_tokens(3)
    assert int((tokens == 17).sum()) == 2 and int((tokens == 18).sum()) == 1 and int((tokens == 16).sum()) == 1
    assert bool((tokens[1:][(tokens[1:] != 17) & (tokens[1:] != 18)] < 16).all())
    blocks = c.block_ids(tokens)
    assert blocks.tolist() == [NO_BLOCK] + [f for f in range(3) for _ in range(17)]
    # tokens after the first eov belong to no block
    assert c.block_ids(torch.cat([tokens, torch.tensor([3, 4])]))[-2:].tolist() == [NO_BLOCK, NO_BLOCK]
    # one image [H, W, 3] is a one-frame video
    image = random_video(frames=1)[0]
    assert torch.equal(c.encode(image), c.encode(image[None]))


def test_codes_are_the_float64_nearest_codes_of_the_encoder_output():
    c = small_codec().double()
    c.quantizer.codebook.normal_()  # a codebook at the scale of the encoder output
    video = random_video(frames=2)
    codes = c.quantize(video)
    with torch.no_grad():
        z = c.autoencoder.encode(((video.double() / 127.5 - 1).permute(0, 3, 1, 2))[None])[0]  # [F, C, h, w]
    z = z.permute(0, 2, 3, 1).reshape(-1, 4)
    dist = ((z[:, None, :] - c.quantizer.codebook[None]) ** 2).sum(-1)
    assert torch.equal(codes.flatten(), dist.argmin(-1))
    assert len(codes.unique()) > 1  # the check above is not a constant


def test_decode_inverts_encode_through_the_codebook():
    c = small_codec()
    video = random_video(frames=3)
    frames = c.decode(c.encode(video))
    assert frames.dtype == torch.uint8 and frames.shape == (3, 16, 16, 3)
    assert torch.equal(frames, c.reconstruct(video[None])[0])
    with torch.no_grad():
        z = c.quantizer.codebook[c.quantize(video)].permute(0, 3, 1, 2)[None]  # [1, F, C, h, w]
        expected = unit_to_video(c.autoencoder.decode(z))[0]
    assert torch.equal(frames, expected)


def test_decode_is_robust_to_sampled_tokens():
    c = small_codec()
    bov, eof, eov = 16, 17, 18
    a = torch.arange(16) % 16
    b = (torch.arange(16) * 3) % 16

    def frames_of(*grids):
        return c._decode_codes(torch.stack([g.reshape(4, 4) for g in grids])[None])[0]

    full = torch.cat([torch.tensor([bov]), a, torch.tensor([eof]), b, torch.tensor([eov])])
    assert torch.equal(c.decode(full), frames_of(a, b))
    assert torch.equal(c.decode(full[1:]), frames_of(a, b))  # bov optional
    assert torch.equal(c.decode(torch.cat([full, a, torch.tensor([eof])])), frames_of(a, b))  # stops at eov
    short = torch.cat([a[:5], torch.tensor([eof]), b, b[:3], torch.tensor([eov])])  # short, then long frame
    assert torch.equal(c.decode(short), frames_of(torch.cat([a[:5], torch.zeros(11, dtype=torch.long)]), b))
    tail = torch.cat([a, torch.tensor([eof]), b[:7]])  # no end token: the tail is a last frame
    assert torch.equal(c.decode(tail), frames_of(a, torch.cat([b[:7], torch.zeros(9, dtype=torch.long)])))
    bad = a.clone()
    bad[2] = bov  # a special id inside a frame becomes code 0
    assert torch.equal(c.decode(bad.tolist()), frames_of(torch.where(bad == bov, 0, bad)))
    assert c.decode(torch.tensor([bov, eov])).shape == (1, 16, 16, 3)
    assert c.decode(torch.tensor([], dtype=torch.long)).shape == (0, 16, 16, 3)


def test_generation_helpers():
    c = small_codec()
    assert c.generation_prefix().tolist() == [16]
    assert c.generation_length(torch.tensor([1, 2, 18, 5])) == 3
    assert c.generation_length(torch.tensor([1, 2])) == 2
    allowed = c.generation_constraint(2)
    codes_only = torch.zeros(19, dtype=torch.bool)
    codes_only[:16] = True
    for step in range(2 * 17):
        mask = allowed(step)
        if step in (16,):
            assert mask.nonzero().flatten().tolist() == [17]
        elif step == 33:
            assert mask.nonzero().flatten().tolist() == [18]
        else:
            assert torch.equal(mask, codes_only)
    with pytest.raises(IndexError):
        allowed(34)


def test_temporal_downsampling_merges_frame_pairs():
    c = small_codec(temporal_downsample=True)
    video = random_video(frames=4)
    tokens = c.encode(video)
    assert c.frames_per_latent == 2 and c.num_tokens(4) == 1 + 2 * 17 == len(tokens)
    assert c.block_ids(tokens).max() == 1
    assert c.decode(tokens).shape == (4, 16, 16, 3)
    with pytest.raises(ValueError, match="even frame count"):
        c.encode(random_video(frames=3))
    with pytest.raises(ValueError, match="even frame count"):
        c.generation_constraint(3)
    with pytest.raises(ValueError, match="even frame count"):
        c.loss(random_video(frames=3)[None])


def test_bad_input_errors_name_the_expected_shape():
    c = small_codec()
    for channels in (1, 4):
        with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
            c.encode(torch.zeros(2, 16, 16, channels, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected 16x16"):
        c.encode(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        c.encode(torch.zeros(2, 16, 16, 3))
    with pytest.raises(ValueError, match=r"\[B, F, H, W, 3\]"):
        c.loss(torch.zeros(2, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not divisible by 4"):
        VQVideoTokenizer(frame_size=18, levels=2)
    with pytest.raises(ValueError, match="recon_loss"):
        VQVideoTokenizer(recon_loss="l3")


def test_loss_updates_the_codebook_only_in_training_mode():
    c = small_codec()
    batch = random_video(frames=2)[None].repeat(2, 1, 1, 1, 1)
    before = c.quantizer.codebook.clone()
    loss, metrics = c.loss(batch)
    assert sorted(metrics) == ["perplexity", "recon", "usage", "vq"] and loss.requires_grad
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    assert torch.equal(c.quantizer.codebook, before)
    c.train()
    c.loss(batch)
    assert not torch.equal(c.quantizer.codebook, before)


def shapes_clips(count: int, frames: int = 4, seed: int = 0) -> torch.Tensor:
    ds = ShapesDataset(num_samples=count, frames=frames, size=32, grid=8, seed=seed)
    return torch.stack([ds[i].media["video"] for i in range(count)])


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() / 127.5 - b.float() / 127.5) ** 2).mean())


@pytest.fixture
def one_thread():
    """Small convolutions gain nothing from threads, and oversubscribed threads on a busy 2-core
    machine make a training loop many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_training_on_shapes_lowers_error_and_uses_the_codebook(one_thread):
    """120 Adam steps (lr 3e-3, 2 clips x 4 frames of 32x32 shapes) on a K=32 codebook: held-out
    reconstruction MSE (in [-1, 1] units) falls at least 5x and below 3/4 of the error of an
    all-black reconstruction (so shapes, not just the background, come back), and the held-out
    clips use at least 8 distinct codes (no codebook collapse; moving shapes have 7 colours)."""
    torch.manual_seed(0)
    codec = VQVideoTokenizer(frame_size=32, levels=2, hidden=16, num_codes=32, code_dim=8,
                             dead_code_threshold=0.01).train()
    clips = shapes_clips(40)
    train, held = clips[:32], clips[32:]
    before = mse(codec.reconstruct(held), held)
    optimiser = torch.optim.Adam(codec.parameters(), lr=3e-3)
    order = torch.randint(0, 32, (120, 2), generator=torch.Generator().manual_seed(0))
    for idx in order:
        loss, _ = codec.loss(train[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = mse(codec.reconstruct(held), held)
    black = mse(torch.zeros_like(held), held)
    used = len(codec.quantize(held.reshape(-1, 32, 32, 3)).unique())
    print(f"held-out mse {before:.4f} -> {after:.4f} (all-black {black:.4f}), distinct codes {used}")
    assert after < before / 5
    assert after < 0.75 * black
    assert used >= 8


def test_checkpoint_round_trip_and_mismatches(tmp_path):
    c = small_codec()
    c.train()
    c.loss(random_video(frames=2)[None])  # EMA statistics differ from a fresh codec
    c.eval()
    save_model(c, c.export_config(), tmp_path / "run")
    assert c.export_config()["codec"]["class_path"] == "mmgrow.tokenizers.vq.VQVideoTokenizer"
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = VQVideoTokenizer(**SMALL, checkpoint=str(tmp_path / "run"))
    video = random_video(frames=2, seed=5)
    assert torch.equal(loaded.encode(video), c.encode(video))
    assert torch.equal(loaded.decode(c.encode(video)), c.decode(c.encode(video)))
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in loaded.state_dict().items())
    # frozen: no gradients, and train() keeps eval mode (codebook stays put)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.training and not loaded.quantizer.training
    # the weights file alone loads too
    VQVideoTokenizer(**SMALL, checkpoint=str(tmp_path / "run" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="num_codes"):
        VQVideoTokenizer(**{**SMALL, "num_codes": 8}, checkpoint=str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="hidden"):
        VQVideoTokenizer(**{**SMALL, "hidden": 16}, checkpoint=str(tmp_path / "run"))
    # without model.yaml the weights decide: mis-shaped tensors are named
    save_model(c, {}, tmp_path / "bare")
    (tmp_path / "bare" / "model.yaml").unlink()
    with pytest.raises(CheckpointError, match="quantizer.codebook"):
        VQVideoTokenizer(**{**SMALL, "num_codes": 8}, checkpoint=str(tmp_path / "bare"))
    with pytest.raises(CheckpointError, match="quantizer.embed_sum"):  # an EMA codebook's buffer is missing
        VQVideoTokenizer(**{**SMALL, "ema_decay": None}, checkpoint=str(tmp_path / "bare"))


def test_codec_config_reads_back_every_argument():
    c = small_codec(temporal_downsample=True, ema_decay=None, beta=0.5)
    cfg = c.codec_config()
    assert cfg == {"frame_size": 16, "levels": 2, "hidden": 8, "num_codes": 16, "code_dim": 4,
                   "temporal_downsample": True, "beta": 0.5, "ema_decay": None, "dead_code_threshold": 1e-3,
                   "recon_loss": "l2"}
    rebuilt = VQVideoTokenizer(**cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in c.state_dict().items()}
