"""Stalled and dead ranks on 2 CPU processes (gloo): bounded failure, a message naming the timeout, no orphans.

Each ``mmgrow fit`` runs in its own session (``start_new_session``) so that every process of the run --
rank 0, the rank 1 Lightning launches as its child, their helpers -- shares one session id: the test
finds leftovers by that id in ``/proc`` and kills the whole group in a ``finally``, so a failing test
never leaves processes behind. A tiny callback (written to a temporary module on ``PYTHONPATH``) drops
``rank<R>.pid`` once training reached step 2, so the faults are injected into a running loop, not
into start-up.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from mmgrow.parallel.faults import COLLECTIVE_FAILURE_EXIT
from mmgrow.testing.distributed import DistributedRunError, run_distributed

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TIMEOUT_S = 6          # collective_timeout_s of the runs below
SLACK_S = 25           # process teardown and a loaded CI machine on top of the timeout
START_S = 180          # start-up until step 2 (imports, process group, data) on a loaded machine

MARKER = '''
import os
from pathlib import Path

import lightning.pytorch as pl


class StepMarker(pl.Callback):
    """Writes <directory>/rank<R>.pid when global_step reaches `step` (the loop is running)."""

    def __init__(self, directory: str, step: int = 2) -> None:
        self.directory, self.step = directory, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.directory, f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))
'''

TINY = ["--trainer.max_steps", "100000", "--trainer.val_check_interval", "100000", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--data.num_train", "100000", "--data.num_val", "2",
        "--data.batch_size", "2", "--model.dim", "16", "--model.depth", "1", "--trainer.log_every_n_steps", "1000"]


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != b"Z":
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return state[state.rindex(b")") + 2:].split()[0] != b"Z"


class _Run:
    """``mmgrow fit`` in a new session, its output in files, the pids of its ranks once step 2 is reached."""

    def __init__(self, tmp: Path, config: str, *extra: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "faults_marker.py").write_text(MARKER)
        self.marks = tmp / "marks"
        self.marks.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tmp), str(ROOT), env.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "mmgrow", "fit", "--config", config, *TINY,
               "--trainer.default_root_dir", str(tmp / "run"),
               "--trainer.callbacks+=faults_marker.StepMarker", "--trainer.callbacks.directory", str(self.marks),
               *extra]
        self.out, self.err = (tmp / "stdout.txt").open("w"), (tmp / "stderr.txt").open("w")
        self.stderr_path = tmp / "stderr.txt"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.out, stderr=self.err, start_new_session=True)

    def rank_pids(self) -> dict[int, int]:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            files = {p.name: p for p in self.marks.glob("rank*.pid")}
            if len(files) == 2 and all(p.read_text() for p in files.values()):
                return {int(n[4:-4]): int(p.read_text()) for n, p in files.items()}
            assert self.proc.poll() is None, f"the run exited early:\n{self.stderr()}"
            time.sleep(0.2)
        raise AssertionError(f"training did not reach step 2 within {START_S} s:\n{self.stderr()}")

    def stderr(self) -> str:
        self.err.flush()
        return self.stderr_path.read_text()[-4000:]

    def no_process_left(self, within: float = 10.0) -> list[int]:
        deadline = time.monotonic() + within
        while (left := _session_pids(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole session's group: rank 0, rank 1, helpers
        except ProcessLookupError:
            pass
        for pid in _session_pids(self.proc.pid):  # any that left the group, found by session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.out.close()
        self.err.close()


def test_stalled_rank_fails_rank_0_naming_the_timeout_and_leaves_no_process(tmp_path):
    """SIGSTOP rank 1 under ContextParallelStrategy (DDP, cp = 1): rank 0 exits 4 within timeout + slack,
    says which knob and value, and the stopped rank is killed (Lightning alone would leave it stopped)."""
    run = _Run(tmp_path, "recipes/quickstart.yaml", "--trainer.devices", "2",
               "--trainer.strategy", "mmgrow.parallel.strategy.ContextParallelStrategy",
               "--trainer.strategy.init_args.collective_timeout_s", str(TIMEOUT_S))
    try:
        ranks = run.rank_pids()
        os.kill(ranks[1], signal.SIGSTOP)
        start = time.monotonic()
        code = run.proc.wait(timeout=TIMEOUT_S + SLACK_S)
        waited = time.monotonic() - start
        err = run.stderr()
        assert code == COLLECTIVE_FAILURE_EXIT, (code, err)
        assert f"within {TIMEOUT_S} s (collective_timeout_s)" in err, err
        assert "Traceback" not in err, err
        print(f"rank 0 exited {waited:.1f} s after SIGSTOP of rank 1 (timeout {TIMEOUT_S} s, measured under load)")
        assert not _alive(ranks[1]), "the stopped rank 1 was left behind"
        assert run.no_process_left() == []
    finally:
        run.close()


def test_dead_rank_under_fsdp_ends_the_run_in_bounded_time(tmp_path):
    """SIGKILL rank 1 under MeshParallelStrategy (recipes/distributed/fsdp_cpu.yaml): rank 0 exits non-zero
    within timeout + slack -- either Lightning's child observer kills it (it polls every 5 s) or its next
    collective loses the peer (exit 4 with our message) -- and nothing of the run is left."""
    run = _Run(tmp_path, "recipes/distributed/fsdp_cpu.yaml",
               "--trainer.strategy.init_args.collective_timeout_s", str(TIMEOUT_S))
    try:
        ranks = run.rank_pids()
        os.kill(ranks[1], signal.SIGKILL)
        start = time.monotonic()
        code = run.proc.wait(timeout=TIMEOUT_S + SLACK_S)
        print(f"rank 0 exited with {code} {time.monotonic() - start:.1f} s after SIGKILL of rank 1 (measured under "
              f"load)")
        assert code != 0, run.stderr()
        if code == COLLECTIVE_FAILURE_EXIT:
            assert "collective_timeout_s" in run.stderr()
        assert run.no_process_left() == []
    finally:
        run.close()


def test_dead_launcher_rank_0_makes_rank_1_exit_in_bounded_time(tmp_path):
    """SIGKILL rank 0 (the process that launched rank 1): rank 1's next collective loses its peer, so it
    exits by itself within timeout + slack instead of training on alone or waiting forever."""
    run = _Run(tmp_path, "recipes/quickstart.yaml", "--trainer.devices", "2",
               "--trainer.strategy", "mmgrow.parallel.strategy.ContextParallelStrategy",
               "--trainer.strategy.init_args.collective_timeout_s", str(TIMEOUT_S))
    try:
        ranks = run.rank_pids()
        os.kill(ranks[0], signal.SIGKILL)
        start = time.monotonic()
        while _alive(ranks[1]) and time.monotonic() - start < TIMEOUT_S + SLACK_S:
            time.sleep(0.2)
        print(f"rank 1 exited {time.monotonic() - start:.1f} s after SIGKILL of rank 0 (measured under load)")
        assert not _alive(ranks[1]), "rank 1 outlived its launcher by more than timeout + slack"
        err = run.stderr()  # rank 1 shares the stderr file: its one-line report names the knob
        assert "collective_timeout_s" in err, err
        assert run.no_process_left() == []
    finally:
        run.close()


def _stall_rank_1(rank: int, world_size: int, directory: str) -> None:
    Path(directory, f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # stalls here until killed
    dist.barrier()


def test_run_distributed_with_a_stalled_rank_raises_within_its_timeout(tmp_path):
    """mmgrow.testing.distributed: a rank that stops itself makes the run raise (rank 0's barrier times
    out) within timeout + slack, and both ranks are gone afterwards."""
    timeout = 15.0  # covers the spawn start-up too, so not shorter on a loaded machine
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_stall_rank_1, 2, str(tmp_path), timeout=timeout)
    took = time.monotonic() - start
    print(f"run_distributed raised after {took:.1f} s (timeout {timeout} s, measured under load)")
    assert took < timeout + SLACK_S, took
    assert "rank 1" in str(info.value), str(info.value)
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids), pids
