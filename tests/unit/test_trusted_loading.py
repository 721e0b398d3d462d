"""Trusted loading: class paths read from a run directory (config.yaml, model.yaml) or a config file
are checked before anything is imported or called (mmgrow/trust.py; docs/training.md, "Trust model").

Each attack names a module that writes a marker file when imported (``evil_mod``), or a standard
library callable that would write one when called; the test asserts the marker is absent, the module
was never imported, and the error names the file key.
"""

from __future__ import annotations

import functools
import re
import sys

import pytest
import torch
import yaml

from mmgrow.growth.base import GrowthError
from mmgrow.layers.attention import FullAttention
from mmgrow.models.unified import UnifiedModel
from mmgrow.protocols import SequenceMixer
from mmgrow.rundir import save_model, seal_run
from mmgrow.training.export import load_model
from mmgrow.trust import TRUST_ENV, UntrustedClassError, trusted_class

EVIL = """
    import pathlib
    pathlib.Path({marker!r}).write_text("imported")

    class Evil:
        def __init__(self, *args, **kwargs):
            pathlib.Path({marker!r}).write_text("called")

    def hook(*args, **kwargs):
        pathlib.Path({marker!r}).write_text("called")
"""

GOOD_MIXER = """
    from mmgrow.protocols import SequenceMixer

    class GoodMixer(SequenceMixer):
        def forward(self, x, ctx, state=None):
            return x, None
"""


@pytest.fixture
def evil(fake_dist, tmp_path):
    """``(module name, marker path)``: a module on sys.path that writes the marker when imported."""
    marker = tmp_path / "marker"
    fake_dist.add_module("evil_mod", EVIL.format(marker=str(marker)))
    yield "evil_mod", marker
    assert not marker.exists(), f"untrusted code ran: marker says {marker.read_text()!r}"
    assert "evil_mod" not in sys.modules, "the untrusted module was imported"


def _run_dir(tmp_path):
    """A tiny run directory: model.safetensors + model.yaml (built-in mixer), and its config."""
    torch.manual_seed(0)
    mixer = functools.partial(FullAttention, num_heads=2)
    model = UnifiedModel(token_space={"text": 11}, dim=16, depth=1, mixer=mixer)
    cfg = {"token_space": {"text": 11}, "dim": 16, "depth": 1,
           "mixer": {"class_path": "mmgrow.layers.attention.FullAttention", "init_args": {"num_heads": 2}}}
    run = tmp_path / "run"
    save_model(model, cfg, run)
    return run, cfg


def _write_model_yaml(run, cfg):
    (run / "model.yaml").write_text(yaml.safe_dump(cfg))


# ------------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("section, key", [("data", "condition_encoder"), ("model", "objective")])
def test_generate_imports_nothing_a_config_yaml_names(evil, tmp_path, capsys, section, key):
    from mmgrow.__main__ import main

    module, _ = evil
    run, _ = _run_dir(tmp_path)
    config = {"data": {"tasks": ["text_to_video"]}, "model": {}}
    config[section][key] = {"class_path": f"{module}.Evil", "init_args": {}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    seal_run(run, ["model.safetensors", "model.yaml"])  # a complete run: only the class path is hostile

    assert main(["generate", "--checkpoint", str(run), "--prompt", "a red square"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmgrow: error: config.yaml: {section}.{key}.class_path: refusing to import "
                          f"'{module}.Evil'"), err
    assert TRUST_ENV in err and len(err.splitlines()) == 1


def test_generate_calls_no_function_even_a_trusted_one(tmp_path, capsys):
    """The issue's reproduction (``subprocess.check_call``) and a function inside mmgrow itself."""
    from mmgrow.__main__ import main

    run, _ = _run_dir(tmp_path)
    marker = tmp_path / "marker"
    for spec in ({"class_path": "subprocess.check_call", "init_args": {"args": ["touch", str(marker)]}},
                 {"class_path": "mmgrow.rundir.atomic_write_bytes", "init_args": {"path": str(marker), "data": b"x"}}):
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"condition_encoder": spec}}))
        seal_run(run, ["model.safetensors", "model.yaml"])
        assert main(["generate", "--checkpoint", str(run), "--prompt", "a red square"]) == 2
        assert "config.yaml: data.condition_encoder.class_path" in capsys.readouterr().err
        assert not marker.exists()


# ------------------------------------------------------------------------------------------------ model.yaml


@pytest.mark.parametrize("where", ["mixer", "mixer_list", "memory"])
def test_load_model_imports_no_untrusted_mixer_from_model_yaml(evil, tmp_path, where):
    module, _ = evil
    run, cfg = _run_dir(tmp_path)
    bad = {"class_path": f"{module}.Evil", "init_args": {}}
    key = {"mixer": "mixer", "mixer_list": "mixer[1]", "memory": "memory"}[where]
    if where == "mixer_list":
        cfg["mixer"] = [cfg["mixer"], bad]
    else:
        cfg[where] = bad
    _write_model_yaml(run, cfg)
    with pytest.raises(UntrustedClassError, match=rf"^model\.yaml: {re.escape(key)}\.class_path: refusing to import "
                                                  rf"'{module}\.Evil'"):
        load_model(run)


@pytest.mark.parametrize("entry, key", [
    ({"class_path": "evil_mod.Evil"}, "growth[0].class_path"),
    # a built-in strategy whose own argument names a class: AddMemoryGrowth's memory spec
    ({"class_path": "add_memory", "init_args": {"memory": {"class_path": "evil_mod.Evil"}}}, "growth[0].init_args"),
])
def test_growth_entries_of_model_yaml_import_nothing_untrusted(evil, tmp_path, capsys, entry, key):
    from mmgrow.__main__ import main
    from mmgrow.training.growth_stage import prepare_stage

    run, cfg = _run_dir(tmp_path)
    _write_model_yaml(run, {**cfg, "growth": [entry]})
    with pytest.raises(GrowthError, match=rf"^model\.yaml: {re.escape(key)}.*refusing to import 'evil_mod\.Evil'"):
        load_model(run)
    # init_from: the checkpoint's growth history is replayed through the same check
    model = UnifiedModel(token_space={"text": 11}, dim=16, depth=1, mixer=functools.partial(FullAttention, num_heads=2))
    with pytest.raises(GrowthError, match=rf"init_from {re.escape(str(run))}: {re.escape(key)}"):
        prepare_stage(model, cfg, str(run), [])
    # mmgrow grow --from RUN, and a --growth value naming the module
    assert main(["grow", "--from", str(run), "--growth", "stack", "--out", str(tmp_path / "out")]) == 2
    assert "refusing to import 'evil_mod.Evil'" in capsys.readouterr().err
    _write_model_yaml(run, cfg)
    assert main(["grow", "--from", str(run), "--growth", "{class_path: evil_mod.Evil}", "--out", str(tmp_path / "o2")]) == 2
    assert "--growth[0].class_path: refusing to import 'evil_mod.Evil'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ config files


@pytest.mark.parametrize("patch, key", [
    ({"data": {"condition_encoder": {"class_path": "evil_mod.Evil"}}}, "data.condition_encoder.class_path"),
    ({"trainer": {"callbacks": [{"class_path": "subprocess.Popen", "init_args": {"args": ["true"]}}]}},
     "trainer.callbacks[0].class_path"),
    # shorthand class value and a Callable argument: jsonargparse would import these strings too
    ({"optimizer": "evil_mod.Evil"}, "optimizer"),
    ({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.LambdaCallback",
                                 "init_args": {"on_fit_start": "evil_mod.hook"}}]}},
     "trainer.callbacks[0].init_args.on_fit_start"),
])
def test_validate_on_a_config_naming_untrusted_code_imports_nothing(evil, tmp_path, capsys, patch, key):
    from mmgrow.training.cli import cli_main

    config = {"model": {"dim": 16, "depth": 1, "mixer": {"class_path": "full"}}, "data": {"num_train": 4}}
    for section, values in patch.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmgrow: error: {path}: {key}: refusing to import"), err


def test_trusted_modules_env_allows_your_own_class(fake_dist, monkeypatch):
    fake_dist.add_module("my_lab_mixers", GOOD_MIXER)
    with pytest.raises(UntrustedClassError, match=f"{TRUST_ENV}=my_lab_mixers"):
        trusted_class("my_lab_mixers.GoodMixer", SequenceMixer, "model.yaml: mixer.class_path")
    assert "my_lab_mixers" not in sys.modules
    monkeypatch.setenv(TRUST_ENV, "other_pkg, my_lab_mixers")
    assert trusted_class("my_lab_mixers.GoodMixer", SequenceMixer).__name__ == "GoodMixer"
    with pytest.raises(TypeError, match="is not a subclass of mmgrow.protocols.SequenceMixer"):
        trusted_class("torch.optim.AdamW", SequenceMixer)
    assert trusted_class("lightning.pytorch.callbacks.ModelCheckpoint").__name__ == "ModelCheckpoint"

