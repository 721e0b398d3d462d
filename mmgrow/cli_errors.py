"""How the console reports bad input: ``mmgrow: error: <one line>``, exit 2, no traceback.

Every console command (``fit/validate/test/predict``, ``grow``, ``generate``, ``plugins``) runs
through :func:`run_command`, so there is one rule for what a user sees:

* a **user error** (bad recipe value, missing or corrupt file, unknown plugin ...) prints one line on
  stderr and exits with the exception's ``exit_code`` attribute (default 2); an exception class that
  needs its own code (a diverged run, say) sets ``exit_code`` and is reported the same way;
* anything else is a bug or an unforeseen case and keeps its traceback;
* ``--debug`` anywhere on the command line, or ``MMGROW_DEBUG=1``, re-raises user errors too, with
  the traceback.

A user error is an exception with an int ``exit_code`` attribute, a file-system or decoding error
(``OSError``, ``UnicodeError``), a :class:`~mmgrow.registry.PluginError` or
:class:`~mmgrow.rundir.CheckpointError`, Lightning's ``MisconfigurationException``, or a
``ValueError`` / ``TypeError`` raised by mmgrow's own code (its validation, :mod:`mmgrow.checks`);
a ``ValueError`` raised inside torch is not one, since its message rarely names the recipe field.
A library that wraps an error (``raise X from err``) is looked through to its cause.

A **collective failure** (a gloo/NCCL timeout or a lost peer rank: another rank stalled or died) is
reported the same way, as :class:`mmgrow.parallel.faults.CollectiveFailure`'s one line naming the
configured ``collective_timeout_s``, exit code 4. When the failing process launched the other ranks
(Lightning's subprocess launcher: rank 0 of ``mmgrow fit --trainer.devices N``), any exception also
kills those ranks first -- with or without ``--debug`` -- so that a stopped or blocked rank is not
left behind (:func:`mmgrow.parallel.faults.stop_launched_ranks`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MMGROW_DEBUG"
USAGE_EXIT = 2
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _raised_by_mmgrow(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE_DIR)


def _named_user_error(exc: BaseException) -> bool:
    """Exception types that are input problems wherever they are raised."""
    if isinstance(getattr(exc, "exit_code", None), int) or isinstance(exc, (OSError, UnicodeError)):
        return True
    from mmgrow.registry import PluginError
    from mmgrow.rundir import CheckpointError

    if isinstance(exc, (PluginError, CheckpointError)):
        return True
    return any(cls.__name__ == "MisconfigurationException" for cls in type(exc).__mro__)


def user_error(exc: BaseException) -> BaseException | None:
    """The exception to report in one line (``exc`` or the user error it wraps), or None for a bug."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _named_user_error(exc) or (isinstance(exc, (ValueError, TypeError)) and _raised_by_mmgrow(exc)):
            return exc
        exc = exc.__cause__
    return None


def one_line(exc: BaseException) -> str:
    """The message on one line (the type name when the exception has no message)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def run_command(fn: Callable[[list[str]], int], argv: list[str]) -> int:
    """``fn(argv)`` (``--debug`` removed) with user errors printed as ``mmgrow: error: ...``; returns the exit code."""
    debug = debug_requested(argv)
    args = [a for a in argv if a != DEBUG_FLAG]
    try:
        return fn(args)
    except BrokenPipeError:
        # The reader went away (``mmgrow plugins list | head``): not an error. Point stdout at devnull so
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from mmgrow.parallel.faults import collective_failure, stop_launched_ranks

        stop_launched_ranks()  # rank 0 failed: the ranks it launched must not outlive it
        reported = None if debug else (collective_failure(exc) or user_error(exc))
        if reported is None:
            raise
        print(f"mmgrow: error: {one_line(reported)}", file=sys.stderr)
        code = getattr(reported, "exit_code", USAGE_EXIT)
        return code if isinstance(code, int) else USAGE_EXIT
