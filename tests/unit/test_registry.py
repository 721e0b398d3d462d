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
