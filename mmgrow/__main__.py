"""``mmgrow`` / ``python -m mmgrow``: dispatches to the plugin tools, ``grow``, ``generate``, ``evaluate``, ``merge`` or the Lightning CLI.

``mmgrow`` alone or ``mmgrow --help`` prints :data:`SUBCOMMANDS` without importing Lightning (the
subcommands' own ``--help`` goes to each of them: ``mmgrow fit --help`` is LightningCLI's).

Every command runs through :func:`mmgrow.cli_errors.run_command`: a user error prints
``mmgrow: error: <one line>`` and exits 2 (``--debug`` or ``MMGROW_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import importlib
import sys

from mmgrow.cli_errors import run_command

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("mmgrow.training.cli:cli_main", "train from a YAML recipe (writes a run directory)"),
    "validate": ("mmgrow.training.cli:cli_main", "validation loss of a checkpoint (into <run>/eval/validate-N/)"),
    "test": ("mmgrow.training.cli:cli_main", "test loss on the held-out split (into <run>/eval/test-N/)"),
    "predict": ("mmgrow.training.cli:cli_main", "run the model's predict step (into <run>/eval/predict-N/)"),
    "plugins": ("mmgrow.plugin_cli:plugins_main", "list registered plugins; check one against its kind's contract"),
    "grow": ("mmgrow.training.grow_cli:grow_main", "grow a trained model offline into a new model directory"),
    "generate": ("mmgrow.training.generate_cli:generate_main", "videos (GIF + MP4) from a trained run and prompts"),
    "evaluate": ("mmgrow.training.evaluate_cli:evaluate_main",
                 "evaluate a trained run: `evaluate tasks` (per-task metrics), `evaluate needle` (retrieval by length and depth)"),
    "data": ("mmgrow.data_cli:data_main", "inspect a recipe's data: task shares, tokens, rows, padding, skipped files"),
    "merge": ("mmgrow.training.merge_cli:merge_main", "average the weights of runs of one architecture; --sweep: A..B"),
    "scaling": ("mmgrow.scaling.cli:scaling_main",
                "scaling laws: `scaling sweep` (run a grid), `scaling fit`, `scaling predict`, `scaling plot`"),
    "ablate": ("mmgrow.ablation.cli:ablate_main",
               "train a base recipe's named variants (and a grid, seeds) with the same data and budget"),
    "report": ("mmgrow.report.cli:report_main",
               "compare run directories: DIR/report.md (mean +- spread over seeds), plots, automatic Elo"),
}
"""``name -> ("module:function", one-line help)``; the function takes the arguments after the name
(the Lightning subcommands take them including the name)."""


def top_level_help() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join([
        "usage: mmgrow SUBCOMMAND [options]   (also: python -m mmgrow ...)",
        "",
        "mmgrow: train and evaluate unified multimodal models from YAML recipes.",
        "",
        "subcommands:",
        *lines,
        "",
        "Run `mmgrow SUBCOMMAND --help` for a subcommand's options, e.g. `mmgrow fit --help`.",
    ])


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = argv[0] if argv[0] in SUBCOMMANDS else "fit"  # anything else (a typo ...): LightningCLI reports it
    module, _, function = SUBCOMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function)(argv if name in LIGHTNING_SUBCOMMANDS else argv[1:])


def main(argv: list[str] | None = None) -> int:
    return run_command(_dispatch, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
