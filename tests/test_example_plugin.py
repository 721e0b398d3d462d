"""The template third-party plugin ``plugins/mmgrow-example``, installed the way a user would.

The package is built and installed with pip into a temporary ``--target`` folder (from a copy of
its sources, so no ``build/`` or ``*.egg-info`` is left in the repository, and the virtual
environment is never modified); subprocesses see it through ``PYTHONPATH`` exactly as an installed
distribution: mmgrow finds it by its entry-point metadata alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SRC = REPO / "plugins" / "mmgrow-example"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """Environment variables for a subprocess in which ``mmgrow-example`` is installed."""
    tmp = tmp_path_factory.mktemp("mmgrow_example")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"
    assert list(site.glob("mmgrow_example-*.dist-info")), "pip left no dist-info metadata"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}


def _mmgrow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmgrow", "plugins", *args], capture_output=True, text=True, check=False,
                          timeout=300, env=env, cwd=str(REPO))


def test_installed_plugin_is_listed_with_its_distribution(plugin_env):
    out = _mmgrow(plugin_env, "list", "--kind", "mixers", "--json")
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["name"] == "short_conv"]
    assert rows == [{"kind": "mixers", "name": "short_conv", "distribution": "mmgrow-example", "version": "0.1.0",
                     "target": "mmgrow_example.short_conv:ShortConvMixer", "status": "ok"}]

    table = _mmgrow(plugin_env, "list", "--pattern", "short_*")
    assert table.returncode == 0, table.stderr
    line = next(line for line in table.stdout.splitlines() if "short_conv" in line)
    assert "mmgrow-example" in line and "0.1.0" in line and "ok" in line


def test_installed_plugin_passes_mmgrow_plugins_check(plugin_env):
    out = _mmgrow(plugin_env, "check", "short_conv")
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("no_future_leakage", "packed_equals_separate", "state_split_equals_one_pass",
                  "decode_equals_prefill", "unsupported_features_raise", "plugin:check_matches_per_token_loop"):
        assert f"PASS {check}" in out.stdout, out.stdout
    assert "FAIL" not in out.stdout


def test_without_the_install_the_plugin_is_unknown():
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    out = _mmgrow(env, "check", "short_conv")
    if "mmgrow-example" in out.stdout:
        pytest.skip("mmgrow-example is installed in this environment itself")
    assert out.returncode == 2 and "unknown plugin 'short_conv'" in out.stderr


def test_kill_switch_hides_the_installed_plugin(plugin_env):
    out = _mmgrow({**plugin_env, "MMGROW_DISABLE_PLUGIN_AUTOLOAD": "1"}, "list", "--no-load", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["distribution"] for r in rows} == {"mmgrow"}
    assert "short_conv" not in {r["name"] for r in rows}


def test_installed_plugin_trains_by_name_in_a_recipe(plugin_env, tmp_path):
    """A recipe that names the plugin's mixer (`class_path: short_conv`) trains and exports it."""
    recipe = tmp_path / "short_conv.yaml"
    recipe.write_text(
        "trainer: {accelerator: cpu, devices: 1, max_steps: 3, limit_val_batches: 1, val_check_interval: 2,\n"
        "          check_val_every_n_epoch: null, enable_progress_bar: false}\n"
        "model:\n  dim: 32\n  depth: 2\n  mixer: {class_path: short_conv, init_args: {kernel_size: 3}}\n"
        "data:\n  num_train: 16\n  num_val: 4\n  batch_size: 4\n"
        "  dataset_args: {frames: 2, size: 32}\n  codec_args: {video: {grid: 4}}\n"
    )
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "mmgrow", "fit", "--config", str(recipe),
                          "--trainer.default_root_dir", str(run)],
                         capture_output=True, text=True, check=False, timeout=600, env=plugin_env, cwd=str(REPO))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "mmgrow_example.short_conv.ShortConvMixer" in (run / "config.yaml").read_text()
    model_yaml = (run / "model.yaml").read_text()
    assert "mmgrow_example.short_conv.ShortConvMixer" in model_yaml and "kernel_size: 3" in model_yaml
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["final_val_loss"] > 0
    # the KV-cache-free mixer's state is its conv tail: (kernel_size - 1) * dim per layer
    assert summary["state_size_per_example"] == 2 * (3 - 1) * 32


def test_installed_plugin_dataset_is_listed_and_passes_its_checks(plugin_env):
    out = _mmgrow(plugin_env, "list", "--kind", "datasets", "--json")
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["name"] == "blinks"]
    assert [(r["distribution"], r["status"]) for r in rows] == [("mmgrow-example", "ok")]
    check = _mmgrow(plugin_env, "check", "blinks")
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("dataset_contract", "dataset_builds_every_split", "dataset_samples", "dataset_deterministic",
                 "dataset_index_range"):
        assert f"PASS {name}" in check.stdout, check.stdout
