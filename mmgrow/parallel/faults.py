"""Bounded collectives: the timeout knob, what a user sees when a rank stalls or dies, and no orphan ranks.

A collective (all-reduce, barrier, ring hop ...) waits for every rank. When one rank stops (a stalled
GPU, a ``SIGSTOP``, a deadlock) or dies (OOM-killed, a node lost), the others wait until the process
group's timeout and then fail with a backend message (gloo: ``Timed out waiting 30000ms for recv``,
``Connection closed by peer``; NCCL: ``Watchdog caught collective operation timeout``). Torch's default
timeout is 30 minutes; mmgrow's strategies take ``collective_timeout_s`` instead
(:data:`DEFAULT_COLLECTIVE_TIMEOUT_S` = 10 minutes) and the console turns those backend messages into
one line (:func:`collective_failure`)::

    mmgrow: error: a collective did not complete within 5 s (collective_timeout_s): a rank stalled or
    died ... (exit code 4)

Why 600 s: the longest legitimate wait of a healthy run is the other ranks sitting in a barrier while
rank 0 alone writes a checkpoint, gathers and writes ``model.safetensors`` or generates held-out
samples -- minutes for a large model on a slow file system, not tens of minutes. A run whose rank 0
writes for longer sets a larger value; a test sets a few seconds.

NCCL (GPUs): the timeout bounds a stalled GPU only when the NCCL watchdog is allowed to abort the
communicator: ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (torch's default: a timed-out collective tears the
process down instead of leaving it hanging) or ``TORCH_NCCL_BLOCKING_WAIT=1`` (the host waits on each
collective and raises a ``DistBackendError`` after the timeout: easier to read, slower). The shipped
SLURM and torchrun scripts set ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``. Not exercised here (no GPU).

No orphans: under Lightning's subprocess launcher rank 0 is the parent of ranks ``1..N-1``. Lightning
kills them when one of them *exits* non-zero (its child-process observer), but not when rank 0 itself
fails -- a stopped rank 1 would then outlive the run. :func:`stop_launched_ranks` kills them; the
console (:mod:`mmgrow.cli_errors`) and :class:`~mmgrow.parallel.strategy.ContextParallelStrategy` call it
when rank 0 fails. A dead rank 0 is noticed by the children at their next collective (connection
closed), at the latest after the timeout.

This module imports neither torch nor Lightning (the console imports it on every error).
"""

from __future__ import annotations

import math
import os
import re
import signal
from datetime import timedelta
from typing import Any

DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
"""Seconds a collective may wait for the other ranks (torch's own default is 1800)."""

STARTUP_TIMEOUT_S = 300.0
"""The rendezvous (``init_process_group``) waits at least this long, whatever ``collective_timeout_s`` says:
ranks start at different times (imports, a slow node), which is not a stall. The strategies create the
group with ``max(collective_timeout_s, STARTUP_TIMEOUT_S)`` and then lower it
(:func:`apply_collective_timeout`)."""

COLLECTIVE_FAILURE_EXIT = 4
"""Exit code of ``mmgrow fit`` when a collective timed out or a peer rank vanished (2: bad input, 3: diverged)."""

_configured_timeout_s: float | None = None  # the last value given to collective_timeout() in this process


def collective_timeout(seconds: Any, owner: str) -> timedelta:
    """``seconds`` as the ``timedelta`` torch's process groups take, after checking it.

    Args:
        seconds: a positive, finite number of seconds (int or float; not a bool, not a string).
        owner: who asks (a strategy's class name), to start the error message with.

    Raises:
        ValueError: ``seconds`` is not a positive finite number.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{owner}: collective_timeout_s must be a positive, finite number of seconds (e.g. "
                         f"{DEFAULT_COLLECTIVE_TIMEOUT_S:g}), got {seconds!r}")
    global _configured_timeout_s
    _configured_timeout_s = float(seconds)
    return timedelta(seconds=float(seconds))


def startup_timeout(seconds: float) -> timedelta:
    """The rendezvous timeout for a collective timeout of ``seconds``: ``max(seconds, STARTUP_TIMEOUT_S)``."""
    return timedelta(seconds=max(float(seconds), STARTUP_TIMEOUT_S))


def apply_collective_timeout(seconds: float, groups: Any = ()) -> None:
    """Set ``seconds`` as the timeout of the default process group and of ``groups`` (e.g. a device mesh's
    sub-groups: ``new_group`` gives them torch's default, not the default group's).

    Call after ``init_process_group`` (which ran with :func:`startup_timeout`) on every rank."""
    import torch.distributed as dist

    timeout = timedelta(seconds=float(seconds))
    dist.set_timeout(timeout)
    for group in groups:
        if group is not None:
            dist.set_timeout(timeout, group)


# ---------------------------------------------------------------------------------------------- recognising

# Backend messages of a collective that could not complete. Lower-case substrings / regexes; the first
# group of a timeout pattern, where there is one, is the timeout in milliseconds as the backend saw it.
_TIMEOUT_PATTERNS = (
    re.compile(r"timed out waiting (\d+)\s*ms"),                          # gloo: recv/send of a collective
    re.compile(r"timed out after (\d+) seconds? waiting for clients"),    # TCPStore rendezvous (s, not ms)
    re.compile(r"ran for (\d+) milliseconds before timing out"),          # NCCL watchdog
    re.compile(r"collective operation timeout"),                          # NCCL watchdog, other wording
    re.compile(r"wait timeout after (\d+)\s*ms"),                         # TCPStore / barrier on the store
    re.compile(r"socket timeout"),                                        # c10d store
    re.compile(r"application timeout caused pair closure"),               # gloo: a pair closed on its timeout
)
_PEER_PATTERNS = (
    re.compile(r"connection closed by peer"),                             # gloo: the peer process is gone
    re.compile(r"connection reset by peer"),
    re.compile(r"broken pipe"),
    re.compile(r"failed to recv, got 0 bytes"),                           # c10d store: the server went away
    re.compile(r"nccl communicator was aborted"),
    re.compile(r"ncclremoteerror"),
)
_DIST_CLASSES = ("DistBackendError", "DistNetworkError", "DistStoreError", "DistError")


class CollectiveFailure(RuntimeError):
    """A collective did not complete: a peer rank stalled (timeout) or vanished (connection lost).

    Reported by the console in one line with exit code :data:`COLLECTIVE_FAILURE_EXIT`.

    Args:
        kind: ``"timeout"`` or ``"peer_lost"``.
        timeout_s: the configured timeout in seconds, when known.
        backend_message: the first line of the backend's own message.
    """

    exit_code = COLLECTIVE_FAILURE_EXIT

    def __init__(self, kind: str, timeout_s: float | None, backend_message: str) -> None:
        super().__init__(kind, timeout_s, backend_message)
        self.kind, self.timeout_s, self.backend_message = kind, timeout_s, backend_message

    def __str__(self) -> str:
        limit = f"{self.timeout_s:g} s" if self.timeout_s is not None else "its timeout"
        if self.kind == "timeout":
            head = (f"a collective did not complete within {limit} (collective_timeout_s): another rank stalled, "
                    f"died or did not start")
        else:
            head = (f"a collective lost its peer (connection closed) before the {limit} timeout "
                    f"(collective_timeout_s): another rank died")
        return (f"{head}. Look at the other ranks' output for their own error (OOM, a crash, a stopped or "
                f"preempted process); if a rank was only slow (rank 0 writing a large checkpoint, a slow file "
                f"system), raise --trainer.strategy.init_args.collective_timeout_s. Backend said: "
                f"{self.backend_message}")


def collective_failure(exc: BaseException) -> CollectiveFailure | None:
    """The :class:`CollectiveFailure` ``exc`` (or an exception it wraps) stands for, else None.

    Recognises torch's ``DistBackendError`` family and ``RuntimeError`` messages of gloo, NCCL and the
    c10d store: timeouts (``Timed out waiting 5000ms``, ``ran for 600010 milliseconds before timing
    out``) and lost peers (``Connection closed by peer``, ``Connection reset by peer``).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CollectiveFailure):
            return current
        found = _classify(current)
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _classify(exc: BaseException) -> CollectiveFailure | None:
    is_dist = any(cls.__name__ in _DIST_CLASSES for cls in type(exc).__mro__)
    if not (is_dist or isinstance(exc, RuntimeError)):
        return None
    text = str(exc)
    low = text.lower()
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    for pattern in _TIMEOUT_PATTERNS:
        match = pattern.search(low)
        if match:
            seen_s = None
            if match.groups():
                seen_s = float(match.group(1)) / (1.0 if "seconds" in pattern.pattern else 1000.0)
            return CollectiveFailure("timeout", _configured_timeout_s or seen_s, first[:300])
    for pattern in _PEER_PATTERNS:
        if pattern.search(low):
            return CollectiveFailure("peer_lost", _configured_timeout_s, first[:300])
    return None


# ---------------------------------------------------------------------------------------------- orphans

def launched_ranks(parent: int | None = None) -> list[int]:
    """Pids of the ranks this process launched: its direct children that carry Lightning's ``LOCAL_RANK``.

    Read from ``/proc`` (Linux); an empty list elsewhere or when there are none (torchrun, SLURM: the
    ranks are siblings and their launcher handles them)."""
    parent = os.getpid() if parent is None else parent
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            # "pid (comm) state ppid ...": comm may contain spaces or parentheses, so split after the last ')'
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if any(item.startswith(b"LOCAL_RANK=") for item in env):
            pids.append(int(entry))
    return sorted(pids)


def stop_launched_ranks() -> list[int]:
    """``SIGKILL`` the ranks this process launched (see :func:`launched_ranks`); returns their pids.

    ``SIGKILL`` because a rank blocked in a collective (or stopped) does not act on ``SIGTERM``; the run
    is over once rank 0 fails, and checkpoints are written by rank 0 anyway."""
    pids = launched_ranks()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in pids:  # reap them, so none is left as a zombie while this process finishes
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
    return pids
