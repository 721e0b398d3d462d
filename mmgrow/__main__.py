"""``mmgrow`` / ``python -m mmgrow``: dispatches to the plugin tools, ``grow``, ``generate`` or the Lightning CLI."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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


if __name__ == "__main__":
    sys.exit(main())
