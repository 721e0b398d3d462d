"""Crash-safe run directories: step checkpoints before the first epoch ends, last.ckpt always the newest,
temporary files beside their target, and a kill -9 at chosen points of a save leaves a consistent,
loadable run directory (readers say it is incomplete) and nothing in the system temp directory."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from mmgrow.rundir import (
    CheckpointError,
    atomic_file,
    check_run,
    read_manifest,
    read_weights,
    remove_stale_temps,
)
from mmgrow.training.callbacks import ExportWeights
from mmgrow.training.checkpointing import DEFAULT_EVERY_N_TRAIN_STEPS, StepCheckpoint
from mmgrow.training.cli import build_cli
from mmgrow.training.export import load_model

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")
TINY = ["--model.dim", "32", "--model.depth", "1", "--data.num_val", "8",
        "--data.dataset_args", "{frames: 2, size: 32}", "--data.codec_args", "{video: {grid: 4}}",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "4"]
# checkpoints every 2 steps; no sampled videos (not what these tests are about, and slow)
EVERY_2 = ('[{"class_path": "mmgrow.training.checkpointing.StepCheckpoint", "init_args": {"every_n_train_steps": 2}},'
           ' {"class_path": "mmgrow.training.samples.GenerateSamples", "init_args": {"num_samples": 0}}]')


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def stray_temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


class LastCheckpointProbe(pl.Callback):
    """At the start of each training step: the step last.ckpt holds (None when there is none)."""

    def __init__(self, run: Path) -> None:
        self.last = run / "checkpoints" / "last.ckpt"
        self.seen: dict[int, int | None] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = ckpt_step(self.last) if self.last.exists() else None


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory):
    """A tiny run of 5 steps inside one epoch (8 batches), checkpointing every 2 steps, with a probe."""
    run = tmp_path_factory.mktemp("completed")
    cli = build_cli(["--config", QUICKSTART, *TINY, "--data.num_train", "256", "--trainer.max_steps", "5",
                     "--trainer.callbacks", EVERY_2, "--trainer.default_root_dir", str(run)], run=False)
    probe = LastCheckpointProbe(run)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return run, cli, probe


def test_step_checkpoints_are_written_before_the_first_epoch_ends(completed_run):
    run, cli, probe = completed_run
    assert cli.trainer.num_training_batches == 8 and cli.trainer.global_step == 5  # max_steps < 1 epoch
    assert probe.seen == {0: None, 1: None, 2: 2, 3: 2, 4: 4}  # a kill at step 3 keeps step 2's state
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 5  # and the final state at the end of fit
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # nothing newer to lag behind


def test_every_run_gets_step_checkpoints_every_100_steps_by_default(tmp_path):
    for recipe in (QUICKSTART, str(ROOT / "recipes/codecs/vq_audio.yaml")):
        cli = build_cli(["--config", recipe, "--trainer.default_root_dir", str(tmp_path)], run=False)
        ckpt = cli.trainer.checkpoint_callback
        assert isinstance(ckpt, StepCheckpoint) and ckpt._every_n_train_steps == DEFAULT_EVERY_N_TRAIN_STEPS == 100
        assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"


def test_a_completed_run_is_sealed_and_a_changed_file_is_reported(completed_run, tmp_path):
    run, _cli, _ = completed_run
    manifest = read_manifest(run)
    assert manifest["status"] == "complete" and manifest["global_step"] == 5
    assert set(manifest["files"]) == {"model.safetensors", "model.yaml", "summary.json"}
    assert check_run(run) == manifest
    load_model(run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="model.safetensors does not match manifest.json"):
        load_model(copy)
    shutil.copy(run / "model.safetensors", copy / "model.safetensors")
    load_model(copy)
    # a new fit in the directory: from its start the old record no longer describes the directory
    ExportWeights().on_fit_start(SimpleNamespace(is_global_zero=True, default_root_dir=str(copy)), None)
    with pytest.raises(CheckpointError, match=r"incomplete: no manifest.json.*resume with --ckpt_path"):
        load_model(copy)
    shutil.rmtree(copy / "checkpoints")
    (copy / "config.yaml").unlink()  # a weights folder that is not a run directory needs no manifest
    load_model(copy)


# ------------------------------------------------------------------------------------- temporary files


def test_temporary_files_are_beside_the_target_and_removed_on_error_and_sigterm(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    for stop, expected in ((RuntimeError("boom"), RuntimeError), (KeyboardInterrupt(), KeyboardInterrupt),
                           (signal.SIGTERM, SystemExit)):
        with pytest.raises(expected), atomic_file(target) as fh:
            fh.write(b"half of the new")
            assert [p.parent for p in tmp_path.glob(".model.safetensors.*.tmp")] == [tmp_path]
            if stop is signal.SIGTERM:  # the default action would kill the process and leave the file
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("SIGTERM did not stop the write")  # Python runs the handler before this line
            raise stop
        assert target.read_bytes() == b"old" and not stray_temps(tmp_path), stop
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with atomic_file(target) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new" and not stray_temps(tmp_path)


def test_only_temporary_files_of_dead_processes_are_stale(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid no longer runs
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
    stale = tmp_path / f".last.ckpt.{host}.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".last.ckpt.{host}.{os.getppid()}.0123abcd.tmp"
    elsewhere = tmp_path / f".last.ckpt.another-host.{dead.pid}.0123abcd.tmp"  # its pid means nothing here
    other = tmp_path / ".notes.tmp"  # not ours: never touched
    for p in (stale, live, elsewhere, other):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [stale]
    assert live.exists() and elsewhere.exists() and other.exists() and not stale.exists()


# ------------------------------------------------------------------------------------------ kill -9

# Runs `mmgrow fit` with fsync slowed down, so that each atomic write's temporary file stays long enough
# for the watcher to see it; the watcher then sends SIGKILL in the middle of that save.
SLOW_FSYNC = """
import os, sys, time
_fsync = os.fsync
def fsync(fd):
    time.sleep(0.2)
    _fsync(fd)
os.fsync = fsync
from mmgrow.training.cli import cli_main
sys.exit(cli_main(sys.argv[1:]))
"""


def kill_during_save(run: Path, target: str, args: list[str], system_tmp: Path, after_earlier_save: bool) -> Path:
    """Start the fit; SIGKILL it when a temporary file of ``run/target`` appears (with ``after_earlier_save``,
    only once ``target`` exists: an earlier save is there to keep); return that temporary file."""
    system_tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(system_tmp)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FSYNC, "fit", "--config", QUICKSTART, *TINY, *args,
                             "--trainer.default_root_dir", str(run)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = run / target
    deadline = time.monotonic() + 300  # a safety net only: the run reaches the save in seconds
    try:
        while time.monotonic() < deadline:
            temps = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
            if temps and (path.exists() or not after_earlier_save):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return temps[0]
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before a temporary file of {target} appeared: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.002)
        pytest.fail("no save seen")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def assert_consistent_after_kill(run: Path, target: str, temp: Path, system_tmp: Path) -> None:
    assert not [p for p in system_tmp.rglob("*") if p.is_file()], "files left in the system temp directory"
    last = run / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) > 0 and read_weights(last)  # the newest completed checkpoint loads
    with pytest.raises(CheckpointError, match=r"incomplete.*resume with --ckpt_path .*last\.ckpt"):
        load_model(run)  # never a mix of two saves
    assert temp.exists() and temp.parent == (run / target).parent  # beside its target
    assert remove_stale_temps(temp.parent) == [temp]  # its writer is dead: the documented cleanup removes it
    assert not stray_temps(run)


def test_kill_during_a_step_checkpoint_keeps_the_previous_one_and_resume_cleans_up(tmp_path):
    run, system_tmp = tmp_path / "run", tmp_path / "systmp"
    temp = kill_during_save(run, "checkpoints/last.ckpt", ["--data.num_train", "256", "--trainer.max_steps", "40",
                                                           "--trainer.callbacks", EVERY_2], system_tmp,
                            after_earlier_save=True)
    # the kill comes while a later save is being written: the earlier one is intact
    assert not [p for p in system_tmp.rglob("*") if p.is_file()], "files left in the system temp directory"
    step = ckpt_step(run / "checkpoints" / "last.ckpt")
    assert step >= 2 and step % 2 == 0
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model(run)
    # resuming writes into the same folders; its writes remove the dead process's temporary file
    cli = build_cli(["fit", "--config", QUICKSTART, *TINY, "--data.num_train", "256", "--trainer.max_steps",
                     str(step + 1), "--trainer.callbacks", EVERY_2, "--trainer.default_root_dir", str(run),
                     "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert cli.trainer.global_step == step + 1 and not temp.exists() and not stray_temps(run)
    assert read_manifest(run)["status"] == "complete"
    load_model(run)


@pytest.mark.parametrize("target", ["model.safetensors", "manifest.json"])
def test_kill_during_the_export_leaves_an_incomplete_not_a_mixed_run(completed_run, tmp_path, target):
    """A second run into a completed run's directory, killed while writing its record (the new summary.json
    is written before the weights): the old manifest is gone first, so the directory reads as incomplete
    rather than as the old weights with the new summary."""
    source, _, _ = completed_run
    run, system_tmp = tmp_path / "run", tmp_path / "systmp"
    shutil.copytree(source, run)
    temp = kill_during_save(run, target, ["--data.num_train", "32", "--trainer.max_steps", "2",
                                          "--trainer.callbacks", EVERY_2], system_tmp, after_earlier_save=False)
    assert_consistent_after_kill(run, target, temp, system_tmp)
