"""The README's commands work: the two set-up commands exist and `make demo` runs end to end;
the usage commands run; the Python snippet runs."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", README, flags=re.DOTALL | re.MULTILINE)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def _commands(block: str) -> list[str]:
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_exactly_two_setup_commands_backed_by_the_makefile_and_ci():
    blocks = _code_blocks(_section("Set up"), "bash")
    assert [c for b in blocks for c in _commands(b)] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.MULTILINE) and re.search(r"^test:", makefile, flags=re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False, **kw)


@pytest.mark.parametrize("command", [c for c in _commands(_code_blocks(_section("Use"), "bash")[0])
                                     if " fit " not in c and " validate " not in c or "--print_config" in c])
def test_quick_usage_commands_run(command):
    argv = shlex.split(command)
    assert argv[0] == "mmgrow"
    out = _run([sys.executable, "-m", "mmgrow", *argv[1:]])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    if "plugins list" in command:
        for name in ("full", "bytes", "pixels", "autoregressive", "text_to_video", "video_to_text"):
            assert name in out.stdout
    if "--print_config" in command:
        assert "mmgrow.layers.attention.FullAttention" in out.stdout


def test_python_snippets_run_as_written():
    """Every ```python block of the README, executed in order in one namespace, as a reader would paste them."""
    blocks = _code_blocks(README, "python")
    assert blocks, "the README shows no Python"
    namespace: dict = {}
    for i, snippet in enumerate(blocks):
        exec(compile(snippet, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - the README's own code
    assert "full" in namespace["mmgrow"].available("mixers")
    assert namespace["attn"].dim == 64
    assert namespace["y"].shape == namespace["x"].shape


@pytest.mark.slow
def test_make_demo_writes_the_run_directory(tmp_path):
    """`make demo` as a user runs it (in the existing .venv): the quickstart trains, and the GIFs for
    held-out captions show a shape of the asked colour."""
    run = tmp_path / "quickstart"
    out = _run(["make", "demo", f"RUN={run}", f"VENV={Path(sys.executable).parents[1]}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"Run directory: {run}" in out.stdout and ".gif" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_seconds"] < 180, summary["wall_seconds"]
    gifs = sorted((run / "samples").glob("*.gif"))
    assert len(gifs) == 4

    scores = json.loads((run / "samples" / "heldout.json").read_text())
    both = [r for r in scores["samples"] if r["match"]["colour"] and r["match"]["motion"]]
    assert len(both) >= 2, f"only {len(both)} of 4 held-out samples show the asked colour and motion: {scores}"
