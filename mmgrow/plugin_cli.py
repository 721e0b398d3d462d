"""``mmgrow plugins``: list the registered plugins and check one against its kind's contract.

``mmgrow plugins list [--kind K] [--pattern P] [--no-load] [--json]``
    One row per (kind, name, distribution) with its version and status. Every listed plugin is
    imported (unless ``--no-load``) so the status column says ``ok`` or why it cannot be used; a
    broken plugin is a row, never a crash. Exit code 0.

``mmgrow plugins check NAME [--kind K]``
    Imports the plugin and runs the conformance suite for its kind
    (:func:`mmgrow.testing.conformance.run_checks`, which ends with the class's own
    ``conformance_checks()``), printing one line per check. Exit code 0 when everything passes, 1 when a check fails or the
    plugin cannot be loaded, 2 when the name is unknown or ambiguous (registered in several kinds,
    or by several distributions).

Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from mmgrow import registry
from mmgrow.protocols import KINDS

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass
class _CheckLine:
    name: str
    passed: bool
    message: str = ""


def plugins_main(argv: list[str] | None = None) -> int:
    """Entry of ``mmgrow plugins ...``; returns the process exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help or a usage error: argparse already printed the message
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.run(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmgrow plugins", description="List mmgrow plugins and check them against their kind's contract."
    )
    sub = parser.add_subparsers(dest="command", metavar="{list,check}")

    p_list = sub.add_parser("list", help="list registered plugins with their distribution, version and status")
    p_list.add_argument("--kind", choices=KINDS, help="only this kind")
    p_list.add_argument("--pattern", default="*", help="fnmatch pattern on plugin names, e.g. '*attn*'")
    p_list.add_argument("--no-load", action="store_true", help="read metadata only; do not import plugins")
    p_list.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p_list.set_defaults(run=_cmd_list)

    p_check = sub.add_parser("check", help="import one plugin and run its conformance checks")
    p_check.add_argument("name", help="registered plugin name, e.g. 'full'")
    p_check.add_argument("--kind", choices=KINDS, help="needed when NAME is registered in several kinds")
    p_check.set_defaults(run=_cmd_check)
    return parser


# --------------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    kinds = (args.kind,) if args.kind else KINDS
    # plugin_rows imports only the names the pattern selected; status() turns failures into strings.
    rows = registry.plugin_rows(kinds, load=not args.no_load, pattern=args.pattern)
    for row in rows:
        row["status"] = _one_line(row["status"])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return EXIT_OK


def _print_table(rows: list[dict[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mmgrow plugins", title_justify="left")
    for column in ("kind", "name", "distribution", "version"):
        table.add_column(column, no_wrap=True)  # short identifiers: keep whole, let status wrap
    table.add_column("status", overflow="fold")
    for row in rows:
        status = row["status"]
        style = "green" if status == "ok" else ("dim" if status == "not loaded" else "red")
        table.add_row(row["kind"], row["name"], row["distribution"], row["version"], f"[{style}]{_escape(status)}")
    console = Console(highlight=False)
    if rows:
        console.print(table)
    else:
        console.print("no plugins match")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --------------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    name: str = args.name
    kind = args.kind or _resolve_kind(name)
    if kind is None:
        return EXIT_USAGE
    try:
        info = registry.entry(kind, name)
    except (registry.UnknownPluginError, registry.PluginConflictError) as exc:
        return _error(str(exc), EXIT_USAGE)
    try:
        cls = registry.load_plugin(kind, name)
    except registry.PluginError as exc:
        return _error(str(exc), EXIT_FAILED)

    print(f"{kind} plugin {name!r}: {info.value} from {info.dist} {info.version}")
    lines = _suite_checks(kind, cls)
    for line in lines:
        verdict = "PASS" if line.passed else "FAIL"
        print(f"  {verdict} {line.name}" + (f": {_one_line(line.message)}" if line.message and not line.passed else ""))
    failed = sum(not line.passed for line in lines)
    if not lines:
        print(f"loaded OK; no conformance checks are defined for {kind}")
    else:
        print(f"{len(lines) - failed} passed, {failed} failed")
    return EXIT_FAILED if failed else EXIT_OK


def _resolve_kind(name: str) -> str | None:
    """The single kind in which ``name`` is registered; otherwise print why and return None."""
    kinds = registry.find_kinds(name)
    if len(kinds) == 1:
        return kinds[0]
    if len(kinds) > 1:
        options = " or ".join(f"--kind {k}" for k in kinds)
        _print_error(f"plugin name {name!r} is ambiguous: it is registered as {', '.join(kinds)}; pass {options}")
        return None
    import difflib

    every = sorted({n for k in KINDS for n in registry.available(k)})
    close = difflib.get_close_matches(name, every, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    _print_error(f"unknown plugin {name!r} (no kind registers it).{hint} Run `mmgrow plugins list --no-load` "
                 "to see every registered name")
    return None


def _suite_checks(kind: str, cls: type) -> list[_CheckLine]:
    """The conformance suite for ``kind``, which ends with the class's own ``conformance_checks()``
    (see :func:`mmgrow.testing.conformance.run_checks`); a crash of the suite is one failed line."""
    try:
        from mmgrow.testing.conformance import run_checks
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        return [_CheckLine("conformance suite", False, f"cannot import mmgrow.testing.conformance: {exc!r}")]
    try:
        results = list(run_checks(kind, cls))
    except Exception as exc:  # noqa: BLE001
        return [_CheckLine("conformance suite", False, f"run_checks crashed: {type(exc).__name__}: {exc}")]
    return [_CheckLine(str(r.name), bool(r.passed), str(r.message or "")) for r in results]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _print_error(message: str) -> None:
    print(f"mmgrow plugins: error: {_one_line(message)}", file=sys.stderr)


def _error(message: str, code: int) -> int:
    _print_error(message)
    return code
