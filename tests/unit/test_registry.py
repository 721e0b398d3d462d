"""Registry behaviour with fake installed distributions (see the ``fake_dist`` fixture in conftest).

Each test writes ``*.dist-info`` metadata plus plugin modules into a temporary ``sys.path`` entry,
re-runs discovery and checks what the registry reports: metadata-only discovery, listing, name
suggestions, conflicts, isolated load failures, contract checks, the kill switch and local plugins.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from mmgrow import registry
from mmgrow.protocols import PLUGIN_API, SeqContext, SequenceMixer

SCALE_MIXER = """
    from mmgrow.protocols import SequenceMixer

    class ScaleMixer(SequenceMixer):
        '''y = scale * x: the smallest mixer that honours the forward contract.'''

        def __init__(self, *, dim, layer_idx=0, scale=2.0):
            super().__init__(dim=dim, layer_idx=layer_idx)
            self.scale = scale

        def forward(self, x, ctx, state=None):
            self.check_context(x, ctx)
            return x * self.scale, None
"""

BROKEN_AT_IMPORT = """
    raise RuntimeError("boom: the accelerator driver is missing")
"""

NOT_A_MIXER = """
    from torch import nn

    class PlainModule(nn.Module):
        pass
"""

FUTURE_API_MIXER = """
    from mmgrow.protocols import SequenceMixer

    class FutureMixer(SequenceMixer):
        mmgrow_api = ">=2,<3"
"""


class LocalScaleMixer(SequenceMixer):
    """A mixer defined outside any distribution, for :func:`registry.register`."""

    def forward(self, x, ctx, state=None):
        return 3.0 * x, None


def test_discovery_reads_metadata_without_importing(fake_dist):
    fake_dist.add_module("fake_scale_mod", SCALE_MIXER)
    fake_dist.add_distribution("fake-mixers", "0.3.1", {"mmgrow.mixers": {"scale": "fake_scale_mod:ScaleMixer"}})
    registry.discover(refresh=True)

    assert "scale" in registry.available("mixers")
    info = registry.entry("mixers", "scale")
    assert (info.dist, info.version, info.value) == ("fake-mixers", "0.3.1", "fake_scale_mod:ScaleMixer")
    rows = [r for r in registry.plugin_rows(("mixers",), load=False) if r["name"] == "scale"]
    assert [(r["distribution"], r["status"]) for r in rows] == [("fake-mixers", "not loaded")]
    assert registry.import_path("mixers", "scale") == "fake_scale_mod.ScaleMixer"
    assert "fake_scale_mod" not in sys.modules, "discovery must not import plugin code"

    cls = registry.load_plugin("mixers", "scale")
    assert "fake_scale_mod" in sys.modules and cls.__name__ == "ScaleMixer"
    mixer = registry.create("mixers", "scale", dim=4, scale=3.0)
    x = torch.randn(2, 5, 4)
    y, _ = mixer(x, SeqContext.simple(2, 5))
    torch.testing.assert_close(y, 3.0 * x)


def test_available_filters_by_pattern_and_sorts_naturally(fake_dist):
    targets = {n: f"never_imported_mod:{n.upper()}" for n in ("mix10", "mix2", "mix1", "other")}
    fake_dist.add_distribution("fake-many", "1.0", {"mmgrow.mixers": targets})
    registry.discover(refresh=True)

    assert registry.available("mixers", "mix*") == ["mix1", "mix2", "mix10"]
    assert registry.available("mixers", "mix1*") == ["mix1", "mix10"]
    assert registry.available("mixers", "*ther") == ["other"]
    assert registry.available("tokenizers", "mix*") == []
    assert "never_imported_mod" not in sys.modules


def test_unknown_names_suggest_close_matches(fake_dist):
    fake_dist.add_distribution("fake-conv", "1.0", {"mmgrow.mixers": {"short_conv_fake": "nowhere:X"}})
    registry.discover(refresh=True)

    with pytest.raises(registry.UnknownPluginError, match=r"unknown mixers plugin 'short_conv_fak'.*"
                       r"Did you mean 'short_conv_fake'"):
        registry.load_plugin("mixers", "short_conv_fak")
    with pytest.raises(registry.UnknownPluginError, match=r"Registered mixers: .*short_conv_fake"):
        registry.entry("mixers", "zzzzzz")
    with pytest.raises(registry.UnknownKindError, match=r"unknown plugin kind 'mixer'.*did you mean 'mixers'"):
        registry.available("mixer")


def test_same_name_from_two_distributions_is_a_conflict_naming_both(fake_dist):
    fake_dist.add_module("fake_scale_mod", SCALE_MIXER)
    fake_dist.add_distribution("alpha-plugins", "1.0", {"mmgrow.mixers": {"dup": "fake_scale_mod:ScaleMixer"}})
    fake_dist.add_distribution("beta-plugins", "2.5", {"mmgrow.mixers": {"dup": "fake_scale_mod:ScaleMixer"}})
    registry.discover(refresh=True)

    with pytest.raises(registry.PluginConflictError, match=r"'dup'.*alpha-plugins 1\.0.*beta-plugins 2\.5"):
        registry.load_plugin("mixers", "dup")
    status = registry.status("mixers", "dup")
    assert status.startswith("conflict") and "alpha-plugins" in status and "beta-plugins" in status
    rows = [r for r in registry.plugin_rows(("mixers",)) if r["name"] == "dup"]
    assert sorted(r["distribution"] for r in rows) == ["alpha-plugins", "beta-plugins"]
    assert all(r["status"] == status for r in rows)


def test_import_failure_is_a_named_plugin_load_error_and_listing_survives(fake_dist):
    fake_dist.add_module("fake_broken_mod", BROKEN_AT_IMPORT)
    fake_dist.add_module("fake_scale_mod", SCALE_MIXER)
    fake_dist.add_distribution("broken-plugin", "0.0.7", {
        "mmgrow.mixers": {"broken": "fake_broken_mod:BrokenMixer", "fine": "fake_scale_mod:ScaleMixer"},
    })
    registry.discover(refresh=True)

    with pytest.raises(registry.PluginLoadError) as caught:
        registry.load_plugin("mixers", "broken")
    message = str(caught.value)
    for part in ("mixers plugin 'broken'", "broken-plugin 0.0.7", "RuntimeError: boom: the accelerator driver",
                 "Hint:", registry.AUTOLOAD_ENV):
        assert part in message, f"{part!r} missing from {message!r}"
    assert caught.value.entry.dist == "broken-plugin" and caught.value.entry.version == "0.0.7"
    assert isinstance(caught.value.__cause__, RuntimeError)

    statuses = {r["name"]: r["status"] for r in registry.plugin_rows(("mixers",))}
    assert statuses["broken"].startswith("error: RuntimeError: boom")
    assert statuses["fine"] == "ok"


def test_class_not_subclassing_the_kind_base_is_rejected(fake_dist):
    fake_dist.add_module("fake_plain_mod", NOT_A_MIXER)
    fake_dist.add_distribution("plain-plugin", "1.0", {"mmgrow.mixers": {"plain": "fake_plain_mod:PlainModule"}})
    registry.discover(refresh=True)

    with pytest.raises(registry.PluginLoadError,
                       match=r"plain-plugin 1\.0: fake_plain_mod:PlainModule is not a subclass of "
                             r"mmgrow\.protocols\.SequenceMixer"):
        registry.load_plugin("mixers", "plain")


def test_missing_attribute_is_a_plugin_load_error(fake_dist):
    fake_dist.add_module("fake_scale_mod", SCALE_MIXER)
    fake_dist.add_distribution("typo-plugin", "1.0", {"mmgrow.mixers": {"typo": "fake_scale_mod:ScaleMixr"}})
    registry.discover(refresh=True)

    with pytest.raises(registry.PluginLoadError, match=r"AttributeError: .*ScaleMixr"):
        registry.load_plugin("mixers", "typo")


def test_mmgrow_api_mismatch_names_both_versions(fake_dist):
    fake_dist.add_module("fake_future_mod", FUTURE_API_MIXER)
    fake_dist.add_distribution("future-plugin", "3.0", {"mmgrow.mixers": {"future": "fake_future_mod:FutureMixer"}})
    registry.discover(refresh=True)

    with pytest.raises(registry.PluginLoadError) as caught:
        registry.load_plugin("mixers", "future")
    assert ">=2,<3" in str(caught.value) and PLUGIN_API in str(caught.value)
    assert re.search(r"future-plugin 3\.0", str(caught.value))


def test_kill_switch_keeps_only_mmgrow_entries(fake_dist, monkeypatch):
    fake_dist.add_distribution("fake-extra", "1.0", {"mmgrow.mixers": {"extra": "nowhere:Extra"}})

    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")
    found = registry.discover(refresh=True)
    assert "extra" not in registry.available("mixers")
    assert "full" in registry.available("mixers"), "mmgrow's own entries stay available"
    assert {e.dist for names in found.values() for entries in names.values() for e in entries} == {"mmgrow"}

    monkeypatch.setenv(registry.AUTOLOAD_ENV, "0")
    registry.discover(refresh=True)
    assert "extra" in registry.available("mixers")


def test_register_and_unregister_local_plugins(fake_dist):
    registry.discover(refresh=True)
    try:
        registry.register("mixers", "local_scale", LocalScaleMixer)
        assert "local_scale" in registry.available("mixers")
        assert registry.load_plugin("mixers", "local_scale") is LocalScaleMixer
        rows = [r for r in registry.plugin_rows(("mixers",)) if r["name"] == "local_scale"]
        assert [(r["distribution"], r["status"]) for r in rows] == [("local", "ok")]

        with pytest.raises(registry.PluginConflictError, match=r"'local_scale' is already registered by local"):
            registry.register("mixers", "local_scale", LocalScaleMixer)
        with pytest.raises(registry.PluginConflictError, match=r"'full' is already registered by mmgrow"):
            registry.register("mixers", "full", LocalScaleMixer)

        # A "module:Class" string stays lazy until the plugin is used.
        fake_dist.add_module("fake_local_mod", SCALE_MIXER)
        registry.register("mixers", "lazy_scale", "fake_local_mod:ScaleMixer")
        assert "fake_local_mod" not in sys.modules
        assert registry.load_plugin("mixers", "lazy_scale").__name__ == "ScaleMixer"
    finally:
        registry.unregister("mixers", "local_scale")
        registry.unregister("mixers", "lazy_scale")
    assert "local_scale" not in registry.available("mixers")
    with pytest.raises(registry.UnknownPluginError, match="local_scale"):
        registry.load_plugin("mixers", "local_scale")


def test_import_mmgrow_does_not_import_heavy_frameworks():
    heavy = ("lightning", "pytorch_lightning", "timm", "torchmetrics", "transformers")
    code = (
        "import sys, mmgrow\n"
        "mmgrow.available('mixers'); mmgrow.registry.plugin_rows(load=False)\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"`import mmgrow` imported heavy packages: {out.stdout.strip()}"


# ------------------------------------------------------------------------------------------------ integrity

EVIL_ON_IMPORT = """
    import pathlib
    pathlib.Path({marker!r}).write_text("imported")
    from mmgrow.protocols import SequenceMixer

    class Evil(SequenceMixer):
        def forward(self, x, ctx, state=None):
            return x, None
"""


@pytest.mark.parametrize("spoof_name", ["mmgrow", "other-plugins"])
@pytest.mark.parametrize("autoload_disabled", [False, True])
def test_another_distribution_cannot_shadow_a_builtin(fake_dist, monkeypatch, tmp_path, spoof_name, autoload_disabled):
    """A spoofed distribution (first on sys.path, whatever its metadata name) declaring ``full``."""
    from mmgrow.layers.attention import FullAttention

    marker = tmp_path / "marker"
    fake_dist.add_module("evil_full_mod", EVIL_ON_IMPORT.format(marker=str(marker)))
    fake_dist.add_distribution(spoof_name, "99.0", {"mmgrow.mixers": {"full": "evil_full_mod:Evil",
                                                                       "spoof_extra": "evil_full_mod:Evil"}})
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1" if autoload_disabled else "0")
    with pytest.warns(registry.PluginShadowWarning, match=rf"ignoring mixers plugin 'full' \(evil_full_mod:Evil\) "
                                                           rf"from distribution {spoof_name} 99\.0") \
            if not autoload_disabled else _no_warning():
        registry.discover(refresh=True)

    info = registry.entry("mixers", "full")
    assert info.value == "mmgrow.layers.attention:FullAttention" and info.is_builtin
    assert registry.load_plugin("mixers", "full") is FullAttention
    assert registry.import_path("mixers", "full") == "mmgrow.layers.attention.FullAttention"
    assert ("spoof_extra" in registry.available("mixers")) is not autoload_disabled
    assert not marker.exists() and "evil_full_mod" not in sys.modules


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def check():
        with warnings.catch_warnings():
            warnings.simplefilter("error", registry.PluginShadowWarning)
            yield
    return check()


def test_host_distribution_is_the_one_owning_the_mmgrow_package(tmp_path):
    """Wheel-style (RECORD lists this package's __init__.py) and editable (direct_url.json) hosts are
    recognised; a distribution that only *calls* itself mmgrow is not."""
    import json
    import os
    from importlib import metadata
    from pathlib import Path

    import mmgrow

    def dist_info(name, files=(), direct_url=None):
        d = tmp_path / f"{name}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text("Metadata-Version: 2.1\nName: mmgrow\nVersion: 9\n")
        (d / "RECORD").write_text("".join(f"{f},,\n" for f in files))
        if direct_url is not None:
            (d / "direct_url.json").write_text(json.dumps(direct_url))
        return metadata.PathDistribution(d)

    init = Path(mmgrow.__file__).resolve()
    assert registry.owns_mmgrow(dist_info("wheel", [os.path.relpath(init, tmp_path)]))
    project = init.parent.parent
    assert registry.owns_mmgrow(dist_info("editable", direct_url={"url": project.as_uri(), "dir_info": {"editable": True}}))
    assert not registry.owns_mmgrow(dist_info("name_only"))
    elsewhere = tmp_path / "copy" / "mmgrow"
    elsewhere.mkdir(parents=True)
    (elsewhere / "__init__.py").write_text("")
    assert not registry.owns_mmgrow(dist_info("other_copy", [os.path.relpath(elsewhere / "__init__.py", tmp_path)]))


def test_wrong_mmgrow_api_fails_on_every_path_that_names_the_plugin(fake_dist, tmp_path, capsys):
    """By registry name or import path, in a recipe, on the command line, in model.yaml: the same
    PluginLoadError as load_plugin (the check used to be bypassed when jsonargparse imported the class)."""
    from mmgrow.models.factories import factory_from_spec
    from mmgrow.training.cli import cli_main, resolve_class_path, rewrite_argv
    from mmgrow.trust import trusted_class

    fake_dist.add_module("fake_future_mod", FUTURE_API_MIXER)
    fake_dist.add_distribution("future-plugin", "3.0", {"mmgrow.mixers": {"future": "fake_future_mod:FutureMixer"}})
    registry.discover(refresh=True)
    api = r"targets mmgrow plugin API '>=2,<3'"
    for value in ("future", "mixers:future", "fake_future_mod.FutureMixer"):
        with pytest.raises(registry.PluginLoadError, match=api):
            resolve_class_path(value)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"model:\n  dim: 16\n  mixer: {{class_path: {value}}}\n")
        with pytest.raises(registry.PluginLoadError, match=api):
            rewrite_argv(["fit", "--config", str(recipe)])
        assert cli_main(["fit", "--config", str(recipe)]) == 2
        assert "future-plugin 3.0" in capsys.readouterr().err
        with pytest.raises(registry.PluginLoadError, match=api):
            rewrite_argv(["fit", "--model.mixer.class_path", value])
        with pytest.raises(registry.PluginLoadError, match=api):
            factory_from_spec({"class_path": value})
    with pytest.raises(registry.PluginLoadError, match=api):
        trusted_class("fake_future_mod.FutureMixer", SequenceMixer)
