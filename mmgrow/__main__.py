"""``mmgrow`` / ``python -m mmgrow``: dispatches to the plugin tools, ``grow``, ``generate`` or the Lightning CLI.

Every command runs through :func:`mmgrow.cli_errors.run_command`: a user error prints
``mmgrow: error: <one line>`` and exits 2 (``--debug`` or ``MMGROW_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import sys

from mmgrow.cli_errors import run_command


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "plugins":
        from mmgrow.plugin_cli import plugins_main

        return plugins_main(argv[1:])
    if argv and argv[0] == "grow":
        from mmgrow.training.grow_cli import grow_main

        return grow_main(argv[1:])
    if argv and argv[0] == "generate":
        from mmgrow.training.generate_cli import generate_main

        return generate_main(argv[1:])
    from mmgrow.training.cli import cli_main

    return cli_main(argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(_dispatch, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
