"""``mmgrow plugins list/check``: in-process via ``plugins_main`` and as ``python -m mmgrow``.

Broken, ambiguous and self-checking plugins come from fake distributions (``fake_dist`` fixture).
Where a test is about how the CLI combines results (not about the real suite), the conformance
module is replaced by a stub in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections import namedtuple

import pytest

from mmgrow import registry
from mmgrow.plugin_cli import plugins_main

BROKEN_AT_IMPORT = """
    raise RuntimeError("boom: the accelerator driver is missing")
"""

SELF_CHECKING_MIXER = """
    from torch import nn
    from mmgrow.protocols import SequenceMixer

    def always_passes():
        pass

    def always_fails():
        raise AssertionError("the output drifted by 0.5")

    class SelfCheckingMixer(SequenceMixer):
        # y_t = x_t W: token-wise, hence causal; claims no optional capability.
        own_checks = (always_passes,)

        def __init__(self, *, dim, layer_idx=0):
            super().__init__(dim=dim, layer_idx=layer_idx)
            self.proj = nn.Linear(dim, dim, bias=False)

        @classmethod
        def conformance_checks(cls):
            return list(cls.own_checks)

        def forward(self, x, ctx, state=None):
            self.check_context(x, ctx)
            return self.proj(x), None

    class FailingSelfCheckMixer(SelfCheckingMixer):
        own_checks = (always_passes, always_fails)
"""

StubResult = namedtuple("StubResult", "name passed message")


def _stub_conformance(monkeypatch, run_checks):
    """Install ``run_checks`` as ``mmgrow.testing.conformance.run_checks`` for this test."""
    module = types.ModuleType("mmgrow.testing.conformance")
    module.run_checks = run_checks
    monkeypatch.setitem(sys.modules, "mmgrow.testing.conformance", module)


def _list_json(capsys, *args: str) -> list[dict[str, str]]:
    assert plugins_main(["list", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _builtin_entries() -> list[registry.EntryInfo]:
    return [e for names in registry.discover().values() for entries in names.values() for e in entries
            if e.dist == registry.HOST_DISTRIBUTION]


@pytest.fixture
def broken_plugin(fake_dist):
    fake_dist.add_module("fake_broken_mod", BROKEN_AT_IMPORT)
    fake_dist.add_distribution("broken-plugin", "0.0.7", {"mmgrow.mixers": {"broken": "fake_broken_mod:Broken"}})
    registry.discover(refresh=True)
    return fake_dist


# -------------------------------------------------------------------------------------------- list


def test_list_shows_every_builtin_with_status_ok(capsys):
    rows = _list_json(capsys)
    listed = {(r["kind"], r["name"]): r for r in rows if r["distribution"] == "mmgrow"}
    builtins = _builtin_entries()
    assert builtins, "mmgrow's own entry points are missing: reinstall mmgrow (pip install -e .)"
    for e in builtins:
        row = listed[(e.kind, e.name)]
        assert (row["version"], row["status"]) == (e.version, "ok"), f"built-in {e.kind}/{e.name}: {row['status']}"


def test_list_table_names_kind_distribution_version_and_status(capsys):
    assert plugins_main(["list", "--kind", "mixers"]) == 0
    out = capsys.readouterr().out
    full_line = next(line for line in out.splitlines() if " full " in line)
    for cell in ("mixers", "mmgrow", registry.entry("mixers", "full").version, "ok"):
        assert cell in full_line
    assert "tokenizers" not in out


def test_broken_plugin_is_listed_with_its_error_and_list_exits_0(broken_plugin, capsys):
    rows = _list_json(capsys, "--kind", "mixers")
    broken = next(r for r in rows if r["name"] == "broken")
    assert broken["distribution"] == "broken-plugin" and broken["version"] == "0.0.7"
    assert broken["status"].startswith("error: RuntimeError: boom")
    assert next(r for r in rows if r["name"] == "full")["status"] == "ok"

    assert plugins_main(["list"]) == 0  # the rich table, too, survives the broken plugin
    out = capsys.readouterr().out
    assert "broken-plugin" in out and "RuntimeError" in out


def test_list_pattern_and_no_load(broken_plugin, capsys):
    rows = _list_json(capsys, "--pattern", "bro*", "--no-load")
    assert [(r["name"], r["status"]) for r in rows] == [("broken", "not loaded")]
    assert "fake_broken_mod" not in sys.modules
    assert _list_json(capsys, "--pattern", "no_such_*") == []


def test_list_rejects_unknown_kind(capsys):
    assert plugins_main(["list", "--kind", "mixer"]) == 2
    assert "invalid choice: 'mixer'" in capsys.readouterr().err


def test_python_m_mmgrow_plugins_list():
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "mmgrow", "plugins", "list", "--kind", "mixers"],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr
    full_line = next(line for line in out.stdout.splitlines() if " full " in line)
    assert "mmgrow" in full_line and "ok" in full_line


# ------------------------------------------------------------------------------------------- check


def test_check_full_passes_the_real_conformance_suite(capsys):
    assert plugins_main(["check", "full"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "mmgrow.layers.attention:FullAttention" in out
    assert "PASS" in out and "FAIL" not in out and " 0 failed" in out


def test_check_broken_plugin_exits_1_with_one_line_error(broken_plugin, capsys):
    assert plugins_main(["check", "broken"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "'broken'" in captured.err and "broken-plugin 0.0.7" in captured.err and "boom" in captured.err


def test_check_unknown_name_exits_2_and_suggests(capsys):
    assert plugins_main(["check", "fulll"]) == 2
    err = capsys.readouterr().err
    assert "unknown plugin 'fulll'" in err and "Did you mean 'full'" in err
    assert plugins_main(["check", "fulll", "--kind", "mixers"]) == 2
    assert "unknown mixers plugin 'fulll'" in capsys.readouterr().err


def test_check_name_in_two_kinds_needs_kind(fake_dist, monkeypatch, capsys):
    fake_dist.add_module("fake_self_mod", SELF_CHECKING_MIXER)
    target = "fake_self_mod:SelfCheckingMixer"
    fake_dist.add_distribution("twin-plugin", "1.0", {"mmgrow.mixers": {"twin": target},
                                                      "mmgrow.memory": {"twin": target}})
    registry.discover(refresh=True)
    _stub_conformance(monkeypatch, lambda kind, cls: [StubResult(f"{kind}-shape", True, "")])

    assert plugins_main(["check", "twin"]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "--kind mixers or --kind memory" in err
    assert plugins_main(["check", "twin", "--kind", "mixers"]) == 0
    assert "PASS mixers-shape" in capsys.readouterr().out


def test_check_conflicting_distributions_exits_2(fake_dist, capsys):
    fake_dist.add_module("fake_self_mod", SELF_CHECKING_MIXER)
    for dist in ("alpha-plugins", "beta-plugins"):
        fake_dist.add_distribution(dist, "1.0", {"mmgrow.mixers": {"dup": "fake_self_mod:SelfCheckingMixer"}})
    registry.discover(refresh=True)

    assert plugins_main(["check", "dup"]) == 2
    err = capsys.readouterr().err
    assert "alpha-plugins" in err and "beta-plugins" in err


def test_check_runs_the_real_suite_and_the_plugins_own_checks(fake_dist, capsys):
    fake_dist.add_module("fake_self_mod", SELF_CHECKING_MIXER)
    fake_dist.add_distribution("self-plugin", "1.0", {"mmgrow.mixers": {
        "good": "fake_self_mod:SelfCheckingMixer", "drifting": "fake_self_mod:FailingSelfCheckMixer"}})
    registry.discover(refresh=True)

    assert plugins_main(["check", "good"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    for check in ("shapes_and_dtype", "no_future_leakage", "unsupported_features_raise", "plugin:always_passes"):
        assert f"PASS {check}" in out
    assert " 0 failed" in out

    assert plugins_main(["check", "drifting"]) == 1
    out = capsys.readouterr().out
    assert "PASS plugin:always_passes" in out
    assert "FAIL plugin:always_fails: the output drifted by 0.5" in out
    assert " 1 failed" in out


def test_check_reports_failed_and_crashed_suite_checks(fake_dist, monkeypatch, capsys):
    fake_dist.add_module("fake_self_mod", SELF_CHECKING_MIXER)
    fake_dist.add_distribution("self-plugin", "1.0", {"mmgrow.mixers": {"good": "fake_self_mod:SelfCheckingMixer"}})
    registry.discover(refresh=True)

    _stub_conformance(monkeypatch, lambda kind, cls: [StubResult("segments", False, "packed row differs\nby 0.1")])
    assert plugins_main(["check", "good"]) == 1
    assert "FAIL segments: packed row differs by 0.1" in capsys.readouterr().out

    def crashing(kind, cls):
        raise ZeroDivisionError("oops")

    _stub_conformance(monkeypatch, crashing)
    assert plugins_main(["check", "good"]) == 1
    assert "FAIL conformance suite: run_checks crashed: ZeroDivisionError: oops" in capsys.readouterr().out
