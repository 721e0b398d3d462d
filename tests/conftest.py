"""Shared pytest fixtures.

``fake_dist``: builds throw-away installed distributions (a ``*.dist-info`` folder with METADATA
and ``entry_points.txt``, plus plugin modules) in a temporary directory on ``sys.path``, so
registry tests never depend on what is really installed. Teardown removes the directory from
``sys.path``, forgets the plugin modules, restores ``MMGROW_DISABLE_PLUGIN_AUTOLOAD`` and then
re-runs discovery, so the registry cache is back to the real environment for the next test.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest


class FakeDistributions:
    """Factory for fake installed distributions under one ``sys.path`` directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def add_module(self, name: str, source: str) -> Path:
        """Write ``<root>/<name>.py`` (a plugin module importable from ``sys.path``)."""
        path = self.root / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        self.modules.append(name)
        importlib.invalidate_caches()
        return path

    def add_distribution(self, name: str, version: str, entry_points: dict[str, dict[str, str]]) -> Path:
        """Write ``<root>/<name>-<version>.dist-info`` declaring ``{group: {entry name: "mod:Class"}}``.

        Nothing is imported: this is the metadata that ``pip install`` would leave behind.
        """
        dist_info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = []
        for group, entries in entry_points.items():
            lines.append(f"[{group}]")
            lines.extend(f"{entry} = {target}" for entry, target in entries.items())
            lines.append("")
        (dist_info / "entry_points.txt").write_text("\n".join(lines))
        importlib.invalidate_caches()  # importlib.metadata caches directory listings per path
        return dist_info


@pytest.fixture
def fake_dist(tmp_path: Path):
    """A :class:`FakeDistributions` whose directory is on ``sys.path`` for the test's duration.

    Call ``registry.discover(refresh=True)`` after adding distributions.
    """
    from mmgrow import registry

    root = tmp_path / "site"
    root.mkdir()
    factory = FakeDistributions(root)
    env_before = os.environ.get(registry.AUTOLOAD_ENV)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield factory
    finally:
        # Undo everything *before* refreshing, so the cache reflects the real environment again
        # (monkeypatch would undo sys.path / the environment only after this teardown).
        while str(root) in sys.path:
            sys.path.remove(str(root))
        for module in factory.modules:
            sys.modules.pop(module, None)
        if env_before is None:
            os.environ.pop(registry.AUTOLOAD_ENV, None)
        else:
            os.environ[registry.AUTOLOAD_ENV] = env_before
        importlib.invalidate_caches()
        registry.discover(refresh=True)



_CHECKOUT_ONLY: list[tuple[str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    """Entries this checkout's ``pyproject.toml`` declares but the installed metadata lacks (a new
    built-in, before ``pip install -e .`` reruns) are registered locally before collection, so tests
    of a development checkout see (and parametrise over) the plugins it declares. With up-to-date
    metadata this does nothing."""
    import tomllib

    from mmgrow import registry
    from mmgrow.protocols import KINDS

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    groups = tomllib.loads(pyproject.read_text())["project"].get("entry-points", {})
    for group, entries in groups.items():
        kind = group.removeprefix("mmgrow.")
        if not group.startswith("mmgrow.") or kind not in KINDS:
            continue
        for name, target in entries.items():
            if name not in registry.available(kind):
                registry.register(kind, name, target)
                _CHECKOUT_ONLY.append((kind, name))


def pytest_unconfigure(config: pytest.Config) -> None:
    from mmgrow import registry

    for kind, name in _CHECKOUT_ONLY:
        registry.unregister(kind, name)
