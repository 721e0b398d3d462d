"""mmgrow declares exactly what it imports: every declared distribution is imported somewhere in mmgrow/,
every third-party module mmgrow/ imports is declared, and one only in an extra is imported lazily."""

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

IMPORT_NAMES = {"pyyaml": "yaml", "pillow": "PIL", "flash-linear-attention": "fla"}
"""Distributions whose import name is not their name with ``-`` -> ``_``."""

DECLARED_WITHOUT_IMPORT = {"jsonargparse": "LightningCLI's parser; lightning declares it only in an extra"}
TOOLS = {"dev"}
"""Extras of tools (pytest, ruff) rather than of imports; their imported members are still declared."""


def _distribution(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def _import_name(distribution: str) -> str:
    return IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))


def _imports() -> dict[str, list[tuple[Path, bool]]]:
    """Top-level module -> [(file, imported at module level outside try)] over mmgrow/, including
    modules named by string (``importlib.import_module("x")``, ``*_MODULE = "x.y"``)."""
    found: dict[str, list[tuple[Path, bool]]] = {}
    for path in sorted((ROOT / "mmgrow").rglob("*.py")):
        tree = ast.parse(path.read_text())
        eager = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                  and any(isinstance(t, ast.Name) and t.id.endswith("_MODULE") for t in node.targets)):
                names = [node.value.value]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("mmgrow", "__future__"):
                    found.setdefault(top, []).append((path.relative_to(ROOT), id(node) in eager))
    return found


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    core = {_distribution(r) for r in PYPROJECT["dependencies"]}
    extras = {k: {_distribution(r) for r in v} for k, v in PYPROJECT["optional-dependencies"].items()}
    return core, extras


def test_every_declared_dependency_is_imported():
    imported = set(_imports())
    core, extras = _declared()
    declared = core | {d for name, dists in extras.items() if name not in TOOLS for d in dists}
    unused = sorted(d for d in declared if _import_name(d) not in imported and d not in DECLARED_WITHOUT_IMPORT)
    assert not unused, f"declared in pyproject.toml but never imported by mmgrow/: {unused}"


def test_every_third_party_import_is_declared():
    core, extras = _declared()
    everything = core | {d for dists in extras.values() for d in dists}
    by_import = {_import_name(d) for d in everything}
    undeclared = {m: files[0][0] for m, files in _imports().items() if m not in by_import}
    assert not undeclared, f"imported by mmgrow/ but not declared in pyproject.toml: {undeclared}"


def test_optional_packages_are_imported_lazily():
    """A package of an extra only is never imported at a module's top level: a base install imports all of mmgrow."""
    core, extras = _declared()
    optional = {_import_name(d) for dists in extras.values() for d in dists} - {_import_name(d) for d in core}
    eager = {m: [str(f) for f, top in files if top] for m, files in _imports().items() if m in optional}
    assert not {m: f for m, f in eager.items() if f}, eager
