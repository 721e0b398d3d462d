"""The shipped multi-node launchers (``recipes/distributed/slurm_fsdp.sbatch``, ``torchrun_fsdp.sh``) build a
command that the mmgrow CLI accepts: run each in dry-run mode, take the ``mmgrow fit ...`` arguments it
prints and parse them with ``--print_config`` (nothing is launched, no GPU needed). Also: a requeued job
resumes from the run's last checkpoint, and an unknown knob value fails in the parser, not on the cluster."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["recipes/distributed/slurm_fsdp.sbatch", "recipes/distributed/torchrun_fsdp.sh"]


def _dry_run(script: str, env: dict, *extra: str) -> list[str]:
    out = subprocess.run(["bash", script, *extra], cwd=ROOT, env={**os.environ, "MMGROW_DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=60, check=True)
    words = shlex.split(out.stdout)
    return words[words.index("mmgrow") + 1:]  # what follows `python -m mmgrow` / `torchrun ... -m mmgrow`


def _parsed(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "mmgrow", *args, "--print_config"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return yaml.safe_load(out.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_launcher_command_parses_with_the_requested_layout(script, tmp_path):
    args = _dry_run(script, {"TP": "2", "CP": "2", "TIMEOUT_S": "90", "RUN_DIR": str(tmp_path / "run")},
                    "--trainer.max_steps", "7")
    cfg = _parsed(args)
    strategy = cfg["trainer"]["strategy"]["init_args"]
    assert (strategy["tensor_parallel"], strategy["context_parallel"], strategy["collective_timeout_s"]) == (2, 2, 90)
    assert cfg["trainer"]["accelerator"] == "gpu" and cfg["trainer"]["max_steps"] == 7  # extra args come last
    assert cfg["trainer"]["default_root_dir"] == str(tmp_path / "run")
    assert "--ckpt_path" not in args


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_requeued_job_resumes_from_the_last_checkpoint(script, tmp_path):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.mkdir(parents=True)  # a sharded checkpoint is a directory
    args = _dry_run(script, {"RUN_DIR": str(tmp_path / "run")})
    assert args[args.index("--ckpt_path") + 1] == str(last)


def test_a_bad_layout_value_fails_in_the_parser():
    args = _dry_run(SCRIPTS[0], {"TP": "two"})
    out = subprocess.run([sys.executable, "-m", "mmgrow", *args, "--print_config"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode != 0 and "tensor_parallel" in out.stderr
