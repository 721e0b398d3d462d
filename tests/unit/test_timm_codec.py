"""The ``timm_image`` codec and its trainable encoder (tiny timm test models, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmgrow
from mmgrow.data.collate import pad_collate
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.models.input_encoder import TimmImageEncoder
from mmgrow.models.unified import UnifiedModel
from mmgrow.objectives.autoregressive import AutoregressiveObjective
from mmgrow.protocols import Segment
from mmgrow.tokenizers.text import ByteTokenizer
from mmgrow.tokenizers.timm_image import TimmImageCodec

VIT = {"model_name": "test_vit", "model_args": {"img_size": 32}}
CNN = {"model_name": "test_resnet"}


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("args", [VIT, CNN], ids=["vit", "cnn"])
def test_encode_packs_the_normalised_image_and_the_encoder_reassembles_it(args):
    codec = mmgrow.create("tokenizers", "timm_image", **args)
    assert isinstance(codec, TimmImageCodec) and codec.kind == "continuous" and codec.modality == "image"
    n = codec.tokens_per_item
    assert n == (4 if args is VIT else 1)  # test_vit: 16 px patches -> 2x2 tokens; test_resnet: 1x1 map at 32 px
    assert codec.latent_dim == -(-3 * 32 * 32 // n)
    image = images(1)[0]
    latents = codec.encode(image)
    assert latents.dtype == torch.float32 and tuple(latents.shape) == (n, codec.latent_dim)
    # float64 reference of the normalisation, channel-first; the pad after 3HW values is zero
    mean = np.array(codec.mean, dtype=np.float64)[:, None, None]
    std = np.array(codec.std, dtype=np.float64)[:, None, None]
    ref = (image.transpose(2, 0, 1).astype(np.float64) / 255.0 - mean) / std
    flat = latents.reshape(-1)
    np.testing.assert_allclose(flat[: ref.size].double().numpy(), ref.reshape(-1), rtol=0, atol=1e-6)
    assert not flat[ref.size:].any()
    encoder = TimmImageEncoder(dim=8, latent_dim=codec.latent_dim, **args)
    assert encoder.tokens_per_item == n
    back = encoder.image(latents[None])
    assert torch.equal(back[0], codec.normalise(image))  # exact: a reshape of the same floats
    assert tuple(encoder(latents[None].expand(2, -1, -1)).shape) == (2, n, 8)


def test_codec_spec_decode_and_bad_inputs():
    codec = TimmImageCodec(**CNN, frozen=True)
    assert codec.input_encoder_spec() == {
        "class_path": "mmgrow.models.input_encoder.TimmImageEncoder",
        "init_args": {"model_name": "test_resnet", "image_size": 32, "frozen": True, "weights": None, "model_args": {}}}
    assert tuple(codec.mean.tolist()) == pytest.approx((0.5, 0.5, 0.5))  # test_resnet's pretrained_cfg
    with pytest.raises(NotImplementedError, match="input-only"):
        codec.decode(torch.zeros(1, codec.latent_dim))
    with pytest.raises(ValueError, match=r"uint8 \[32, 32, 3\]"):
        codec.encode(np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="timm cannot build"):
        TimmImageCodec(model_name="no_such_timm_model")
    with pytest.raises(ValueError, match="latent_dim=10 cannot hold"):
        TimmImageEncoder(dim=8, latent_dim=10, **CNN)


def caption_batch(codec: TimmImageCodec):
    builder = SequenceBuilder({"text": ByteTokenizer(), "image": codec})
    seqs = [builder.build([Segment("image", im), Segment("text", f"pic {i}", "target")])
            for i, im in enumerate(images(2, seed=1))]
    return builder, pad_collate(seqs)


@pytest.mark.parametrize("frozen", [False, True])
def test_one_training_step_trains_or_keeps_the_timm_network(frozen):
    codec = TimmImageCodec(**CNN, frozen=frozen)
    builder, batch = caption_batch(codec)
    torch.manual_seed(0)
    model = UnifiedModel(token_space=builder.token_space, dim=16, depth=1, continuous=builder.continuous,
                         input_encoders={"image": codec.input_encoder_spec()}).train()
    encoder = model.input_encoders["image"]
    assert encoder.net.training is not frozen  # frozen keeps BatchNorm in eval mode under model.train()
    net_before = {k: v.clone() for k, v in encoder.net.state_dict().items()}
    obj = AutoregressiveObjective().bind(model.token_space)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss, _ = obj.step(model, batch)
    loss.backward()
    grads = [p.grad for p in encoder.net.parameters()]
    assert encoder.proj.weight.grad.abs().sum() > 0
    opt.step()
    after = encoder.net.state_dict()
    if frozen:
        assert all(g is None for g in grads) and not any(p.requires_grad for p in encoder.net.parameters())
        assert all(torch.equal(net_before[k], after[k]) for k in after)  # weights and BatchNorm statistics
    else:
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
        changed = [k for k in after if after[k].is_floating_point() and not torch.equal(net_before[k], after[k])]
        assert any(k.endswith("weight") for k in changed)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_load_from_a_file_and_bad_files_are_named(tmp_path, suffix):
    torch.manual_seed(0)
    source = TimmImageEncoder(dim=8, latent_dim=768, **VIT)
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.net.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(1)
    loaded = TimmImageEncoder(dim=8, latent_dim=768, weights=str(path), **VIT).eval()
    fresh = TimmImageEncoder(dim=8, latent_dim=768, **VIT).eval()
    x = torch.randn(2, 4, 768)
    source.eval()
    torch.testing.assert_close(loaded.net.forward_features(loaded.image(x)),
                               source.net.forward_features(source.image(x)), rtol=0, atol=0)
    assert not torch.allclose(fresh.net.forward_features(fresh.image(x)), source.net.forward_features(source.image(x)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TimmImageEncoder(dim=8, latent_dim=768, weights=str(tmp_path / "missing.pt"), **VIT)
    wrong = tmp_path / "wrong.pt"
    torch.save({**state, "extra.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        TimmImageEncoder(dim=8, latent_dim=768, weights=str(wrong), **VIT)


def test_model_yaml_round_trip_rebuilds_the_encoder(tmp_path):
    from mmgrow.rundir import save_model
    from mmgrow.training.export import load_model
    from mmgrow.training.module import MMGrowModule

    codec = TimmImageCodec(**VIT, frozen=True)
    builder, batch = caption_batch(codec)
    module = MMGrowModule(vocab=builder.token_space.to_dict(), dim=16, depth=1, continuous=builder.continuous,
                          input_encoders={"image": codec.input_encoder_spec()})
    module.configure_model()
    # train_parameters="all" does not unfreeze the frozen timm network; the projection trains
    encoder = module.model.input_encoders["image"]
    assert not any(p.requires_grad for p in encoder.net.parameters()) and encoder.proj.weight.requires_grad
    config = module.model_config()
    assert config["input_encoders"] == {"image": codec.input_encoder_spec()}
    save_model(module.model, config, tmp_path)
    loaded = load_model(tmp_path).eval()
    model = module.model.eval()
    assert isinstance(loaded.input_encoders["image"], TimmImageEncoder)
    obj = AutoregressiveObjective().bind(model.token_space)
    ctx = obj.context(batch)
    torch.testing.assert_close(loaded(batch.input_ids, ctx, latents=batch.latents).hidden,
                               model(batch.input_ids, ctx, latents=batch.latents).hidden, rtol=0, atol=0)
