"""Single-frame image codecs: exact pixel round trip on scenes, tokens equal the video codec's of the
one-frame video, blocks, robust decode, the VQ adapter's training batch shapes, bad input."""

import pytest
import torch

from mmgrow.data.synthetic.scenes import SceneDataset
from mmgrow.protocols import NO_BLOCK
from mmgrow.registry import load_plugin
from mmgrow.testing.conformance import run_checks
from mmgrow.tokenizers.image_pixels import ImagePixelTokenizer, ImageVQTokenizer
from mmgrow.tokenizers.pixels import PixelTokenizer
from mmgrow.tokenizers.vq import VQVideoTokenizer

VQ = {"frame_size": 16, "levels": 2, "hidden": 8, "num_codes": 16, "code_dim": 4}


def test_pixel_round_trip_is_exact_on_scenes_and_matches_the_video_codec():
    codec, video_codec = ImagePixelTokenizer(grid=8), PixelTokenizer(grid=8)
    for size in (8, 32):
        ds = SceneDataset(num_samples=10, size=size, grid=8, seed=3)
        for i in range(len(ds)):
            image = ds[i].media["image"]
            tokens = codec.encode(image)
            assert torch.equal(tokens, video_codec.encode(image[None]))
            step = size // 8
            assert torch.equal(codec.decode(tokens), image[::step, ::step])  # one pixel per cell, exact
            if size == 8:
                assert torch.equal(codec.decode(tokens), image)


def test_pixel_layout_blocks_and_generation():
    codec = ImagePixelTokenizer(grid=4)
    bov, eov = codec.special_tokens["bov"], codec.special_tokens["eov"]
    tokens = codec.encode(torch.zeros(8, 8, 3, dtype=torch.uint8))
    assert tokens.tolist() == [bov] + [0] * 16 + [eov] and codec.num_tokens() == 18
    assert codec.block_ids(tokens).tolist() == [NO_BLOCK] + [0] * 17
    assert codec.generation_prefix().tolist() == [bov]
    assert codec.generation_length(torch.tensor([1] * 16 + [eov, 3, 3])) == 17
    allowed = codec.generation_constraint()
    assert allowed(15)[: codec.num_colours].all() and allowed(16).tolist() == [i == eov for i in range(codec.vocab_size)]
    with pytest.raises(ValueError, match="num_frames=2"):
        codec.generation_constraint(2)


def test_pixel_decode_keeps_frame_zero_of_sampled_output():
    codec = ImagePixelTokenizer(grid=2)
    eof = codec.special_tokens["eof"]
    red = codec.colour_id("red")
    image = codec.decode(torch.tensor([red, red, red, red, eof, 0, 0, 0, 0]))
    assert image.shape == (2, 2, 3) and (image == torch.tensor([255, 0, 0], dtype=torch.uint8)).all()
    empty = codec.decode(torch.tensor([codec.special_tokens["eov"]]))
    assert empty.shape == (2, 2, 3) and not empty.any()


def test_vq_tokens_equal_the_video_codec_of_one_frame():
    torch.manual_seed(0)
    image_codec = ImageVQTokenizer(**VQ).eval()
    video_codec = VQVideoTokenizer(**VQ).eval()
    video_codec.load_state_dict(image_codec.state_dict())
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 16, 16, 3), generator=g, dtype=torch.uint8)
    for image in images:
        tokens = image_codec.encode(image)
        assert torch.equal(tokens, video_codec.encode(image[None]))
        assert torch.equal(image_codec.decode(tokens), video_codec.decode(tokens)[0])
    assert torch.equal(image_codec.reconstruct(images), video_codec.reconstruct(images[:, None])[:, 0])
    torch.manual_seed(2)
    loss_image, _ = image_codec.loss(images)
    torch.manual_seed(2)
    loss_video, _ = video_codec.loss(images[:, None])
    assert torch.equal(loss_image, loss_video)
    assert image_codec.raw_batch_dims == 3 and image_codec.modality == "image"
    assert "temporal_downsample" not in image_codec.codec_config()


def test_bad_images_are_named():
    with pytest.raises(ValueError, match=r"one RGB image of shape \[H, W, 3\]"):
        ImagePixelTokenizer().encode(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 tensor image"):
        ImagePixelTokenizer().encode([[0, 0, 0]])
    with pytest.raises(ValueError, match=r"batch of images \[B, H, W, 3\]"):
        ImageVQTokenizer(**VQ).loss(torch.zeros(2, 1, 16, 16, 3, dtype=torch.uint8))


def test_registered_and_conformant():
    assert load_plugin("tokenizers", "image_pixels") is ImagePixelTokenizer
    for cls in (ImagePixelTokenizer, ImageVQTokenizer):
        results = run_checks("tokenizers", cls)
        assert all(r.passed for r in results), [r for r in results if not r.passed]
    assert {r.name for r in run_checks("tokenizers", ImagePixelTokenizer)} == {"tokenizer_attributes",
                                                                             "tokenizer_round_trip"}
