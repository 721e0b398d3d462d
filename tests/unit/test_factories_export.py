"""Mixer factories <-> config, and model.safetensors / model.yaml export and its error paths."""

import functools
import os

import pytest
import torch

from mmgrow.layers.attention import FullAttention
from mmgrow.models.factories import factory_from_spec, spec_from_factory
from mmgrow.models.unified import UnifiedModel
from mmgrow.protocols import SeqContext
from mmgrow.rundir import CheckpointError, load_weights_into, save_model
from mmgrow.training.export import load_model

VOCAB = {"text": 11, "video": 7}


def _model(seed=0, heads=2):
    torch.manual_seed(seed)
    return UnifiedModel(token_space=VOCAB, dim=16, depth=2, mixer=functools.partial(FullAttention, num_heads=heads))


def test_spec_round_trip_for_class_partial_and_list():
    spec = spec_from_factory(functools.partial(FullAttention, num_heads=2))
    assert spec == {"class_path": "mmgrow.layers.attention.FullAttention", "init_args": {"num_heads": 2}}
    assert spec_from_factory(FullAttention)["init_args"] == {}
    fac = factory_from_spec([spec, spec])
    mixer = fac[1](dim=16, layer_idx=1)
    assert isinstance(mixer, FullAttention) and mixer.num_heads == 2


def test_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="neither a dotted import path"):
        factory_from_spec({"class_path": "FullAttention"})
    with pytest.raises(TypeError, match="not a subclass of mmgrow.protocols.SequenceMixer"):
        factory_from_spec({"class_path": "mmgrow.layers.mlp.SwiGLU"})
    with pytest.raises(ValueError, match="refusing to import 'torch.nn.Linear'"):  # not a trusted module
        factory_from_spec({"class_path": "torch.nn.Linear"})
    with pytest.raises(TypeError, match="cannot describe mixer factory"):
        spec_from_factory(functools.partial(torch.nn.Linear, 3))


def test_save_and_load_model_gives_identical_outputs(tmp_path):
    model = _model()
    cfg = {"token_space": VOCAB, "dim": 16, "depth": 2,
           "mixer": spec_from_factory(functools.partial(FullAttention, num_heads=2))}
    save_model(model, cfg, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "model.yaml"]  # no temp files left
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 18, (2, 9))
    ctx = SeqContext.simple(2, 9)
    assert torch.equal(model(ids, ctx).hidden, loaded(ids, ctx).hidden)


def test_truncated_and_corrupted_weights_are_named(tmp_path):
    model = _model()
    save_model(model, {"token_space": VOCAB, "dim": 16, "depth": 2}, tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_weights_into(_model(), path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_weights_into(_model(), path)


def test_missing_file_and_shape_mismatch(tmp_path):
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_weights_into(_model(), tmp_path / "nope.safetensors")
    save_model(_model(), {"token_space": VOCAB, "dim": 16, "depth": 2}, tmp_path)
    other = UnifiedModel(token_space={"text": 12, "video": 7}, dim=16, depth=2,
                         mixer=functools.partial(FullAttention, num_heads=2))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights_into(other, tmp_path)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    from mmgrow import rundir

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(_model(), {"token_space": VOCAB}, tmp_path)
    assert os.listdir(tmp_path) == []
