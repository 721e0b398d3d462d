"""``mmgrow --help`` lists every subcommand without importing Lightning; the argparse tools print plain
text (no reStructuredText markup); registry names work inside specs given inline on the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmgrow.__main__ import SUBCOMMANDS, main
from mmgrow.cli_text import plain_text
from mmgrow.training.cli import rewrite_argv

ROOT = Path(__file__).resolve().parents[2]


def test_top_level_help_lists_every_subcommand_without_importing_lightning():
    code = ("import io, json, sys, contextlib; from mmgrow.__main__ import main; out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out): rc = main(['--help'])\n"
            "print(json.dumps({'rc': rc, 'help': out.getvalue(), 'lightning': 'lightning' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["rc"] == 0 and not result["lightning"]
    listed = [line.split()[0] for line in result["help"].splitlines() if line.startswith("  ")]
    assert listed == ["fit", "validate", "test", "predict", "plugins", "grow", "generate", "evaluate", "data",
                      "merge", "scaling", "ablate", "report"] == list(SUBCOMMANDS)


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_an_entry(name):
    import importlib

    module, _, function = SUBCOMMANDS[name][0].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_no_arguments_print_the_help_and_fail(capsys):
    assert main([]) == 2
    assert "plugins" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["grow", "generate", "evaluate", "merge"])
def test_tool_help_is_plain_text(tool, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([tool, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"mmgrow {tool}" in out and "``" not in out and ":class:" not in out


@pytest.mark.parametrize("argv", [["scaling", "--help"], ["scaling", "fit", "--help"], ["scaling", "sweep", "--help"]])
def test_scaling_help_is_plain_text(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own --help
        code = exit_.code
    assert code == 0
    out = capsys.readouterr().out
    assert "mmgrow scaling" in out and "``" not in out and ":mod:" not in out


def test_plain_text():
    assert plain_text("``a --b``: see :class:`~x.y.Name` and :func:`x.f`") == "a --b: see Name and x.f"


def test_registry_names_inside_inline_specs():
    argv = rewrite_argv(["fit", "--model.mixer", "{class_path: gated_deltanet, init_args: {num_heads: 2}}",
                         "--model.memory=[{class_path: ttt_linear}]", "--trainer.max_steps", "3"])
    assert json.dumps(argv).count("mmgrow.layers.") == 2
    assert "GatedDeltaNet" in argv[2] and "num_heads: 2" in argv[2]
    assert argv[3].startswith("--model.memory=[") and "mmgrow.layers.ttt.TTTLinear" in argv[3]
    assert argv[4:] == ["--trainer.max_steps", "3"]
