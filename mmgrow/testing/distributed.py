"""Run a function in ``N`` gloo CPU processes from pytest, and get its results (or its failures) back.

:func:`run_distributed` spawns ``world_size`` fresh processes (``torch.multiprocessing`` with the
``spawn`` start method, so no forked torch state), joins them into one gloo process group through
a file store in a temporary directory (no TCP port to pick, so concurrent test runs never collide),
calls ``fn(rank, world_size, *args)`` on every rank and returns the ranks' return values in rank
order. An exception on any rank becomes one :class:`DistributedRunError` carrying every failing
rank's traceback; the other ranks (which may be blocked in a collective waiting for the failed one)
are terminated at once rather than left to hang. A run that exceeds ``timeout`` seconds fails the
same way.

``fn`` must be picklable: a module-level function of an importable module (a test module is fine:
``spawn`` children receive the parent's ``sys.path``). Return values travel back pickled, so keep
them small (numbers, short lists, small tensors).

Example::

    def _worker(rank, world_size, n):
        x = torch.full((n,), float(rank))
        dist.all_reduce(x)
        return x.tolist()

    def test_all_reduce():
        assert run_distributed(_worker, 3, 2) == [[3.0, 3.0]] * 3
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 120.0
_GRACE = 1.0  # seconds to collect the other ranks' errors after the first one


class DistributedRunError(AssertionError):
    """A rank raised, died or timed out; the message holds every failing rank's traceback.

    An ``AssertionError`` so that pytest reports an assertion made inside a child as a test failure."""


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
                    threads_per_rank: int = 1) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, one process per rank.

    Args:
        fn: picklable ``fn(rank, world_size, *args)``; the default process group (gloo) is initialised
            when it runs and destroyed after it returns.
        world_size: number of processes.
        args: picklable extra arguments given to every rank.
        timeout: seconds for the whole run (process start included); also the gloo collective timeout,
            so a rank stuck in a collective raises instead of waiting forever.
        threads_per_rank: ``torch.set_num_threads`` in each child (keeps ``N`` ranks on a small CPU
            from over-subscribing it).

    Raises:
        DistributedRunError: a rank raised (its traceback is in the message), exited without a result
            (e.g. killed), or the run exceeded ``timeout``.
    """
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    context = mp.get_context("spawn")
    results: queue.Queue = context.Queue()
    workdir = tempfile.mkdtemp(prefix="mmgrow-dist-")
    store = os.path.join(workdir, "store")
    procs = [context.Process(target=_child, args=(fn, rank, world_size, store, timeout, threads_per_rank, args,
                                                  results), daemon=True)
             for rank in range(world_size)]
    try:
        for p in procs:
            p.start()
        return _collect(procs, results, world_size, time.monotonic() + timeout, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                try:  # a stopped rank (SIGSTOP, a debugger) acts on SIGTERM only once continued
                    os.kill(p.pid, signal.SIGCONT)
                except OSError:
                    pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(procs: list, results: queue.Queue, world_size: int, deadline: float, timeout: float) -> list[Any]:
    """Read one message per rank; fail fast on the first error, a silent death or the deadline."""
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    while len(values) + len(errors) < world_size:
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs)
                    if r not in values and r not in errors and not p.is_alive() and p.exitcode is not None]
            if dead:
                # A message may still be in flight from a rank that just exited; give it a moment.
                try:
                    rank, ok, payload = results.get(timeout=2.0)
                except queue.Empty:
                    for r in dead:
                        errors[r] = f"exited with code {procs[r].exitcode} without a result"
                    break
            elif time.monotonic() > deadline:
                pending = [r for r in range(world_size) if r not in values and r not in errors]
                errors.update({r: f"no result within {timeout:.0f} s (hung or too slow)" for r in pending})
                break
            else:
                continue
        if ok:
            values[rank] = payload
        else:
            errors[rank] = payload
            errors.update(_late_errors(results, _GRACE))  # what the others say in the next moment, then stop:
            break                                         # they may be blocked on this rank (terminated below)
    if errors:
        report = "\n".join(f"--- rank {r} of {world_size} ---\n{msg}" for r, msg in errors.items())  # first error first
        raise DistributedRunError(f"run_distributed: {len(errors)} rank(s) failed\n{report}")
    return [values[r] for r in range(world_size)]


def _late_errors(results: queue.Queue, grace: float) -> dict[int, str]:
    """Errors other ranks report within ``grace`` seconds of the first one (often its consequences)."""
    late: dict[int, str] = {}
    end = time.monotonic() + grace
    while (left := end - time.monotonic()) > 0:
        try:
            rank, ok, payload = results.get(timeout=left)
        except queue.Empty:
            break
        if not ok:
            late[rank] = payload
    return late


def _child(fn: Callable[..., Any], rank: int, world_size: int, store: str, timeout: float, threads: int,
           args: tuple, results: queue.Queue) -> None:
    """Body of one rank: set up gloo, run ``fn``, report ``(rank, ok, value or traceback)``."""
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        value = fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - every failure, assertions included, goes back to the parent
        # Report before tearing the group down: closing it makes the peers fail with secondary
        # "connection reset" errors, and the root cause should reach the parent first.
        results.put((rank, False, traceback.format_exc()))
    else:
        results.put((rank, True, value))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
