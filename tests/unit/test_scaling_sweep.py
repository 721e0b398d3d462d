"""Scaling sweeps: the grid file, the run list it expands to, the launchers, resume, failures and divergence."""

import json
import shlex
from pathlib import Path

import pytest
import yaml

from mmgrow.scaling import launch
from mmgrow.scaling.grid import SweepGrid
from mmgrow.scaling.sweep import expand, fit_arguments, run_state, shares_budgets
from mmgrow.scaling.sweep_cli import make_plan, sweep_main, write_plan

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"
DIT_BASE = ROOT / "recipes" / "t2v_dit" / "scaling_base.yaml"
TINY_SET = {"model.warmup_steps": 1, "data.num_train": 32, "data.num_val": 4, "data.eval_batch_size": 4}


def grid(**over):
    data = {"sizes": {"s16": {"model.dim": 16}, "s32": {"model.dim": 32}}, "lr": [1e-3, 2e-3],
            "batch_size": [64, 128], "tokens": [512, 256], "tokens_per_sample": 32,
            "set": {"model.min_lr_ratio": 1.0}}
    data.update(over)
    return SweepGrid.from_dict(data)


def test_grid_expands_to_the_declared_runs_with_shared_budgets():
    g = grid()
    runs = expand(g, 32, share=True)
    assert [r.name for r in runs] == [
        f"{s}/lr{lr}_bs{b}_s0" for s in ("s16", "s32") for lr in ("0.001", "0.002") for b in (64, 128)]
    first = runs[0]
    assert first.budgets == [256, 512] and first.batch_samples == 2
    assert (first.max_steps, first.val_every) == (8, 4)  # 512 / 64 steps; validation at 4 and 8 = both budgets
    assert first.overrides == {"model.dim": 16, "model.min_lr_ratio": 1.0, "model.lr": 1e-3, "data.batch_size": 2,
                               "seed_everything": 0, "trainer.max_steps": 8, "trainer.val_check_interval": 4,
                               "trainer.check_val_every_n_epoch": None}
    assert (runs[3].max_steps, runs[3].val_every) == (4, 2)


def test_without_shared_budgets_every_budget_is_its_own_run():
    runs = expand(grid(seeds=[0, 1]), 32, share=False)
    assert len(runs) == 2 * 2 * 2 * 2 * 2
    assert runs[0].name == "s16/lr0.001_bs64_t256_s0" and runs[0].budgets == [256]
    assert (runs[0].max_steps, runs[0].val_every) == (4, 4)
    assert runs[1].name == "s16/lr0.001_bs64_t512_s0" and runs[1].max_steps == 8


def test_budget_sharing_follows_the_schedule():
    assert shares_budgets({}, grid()) is True  # the grid's set makes the lr constant
    decaying = grid(set={})
    assert shares_budgets({"model": {"min_lr_ratio": 1.0}}, decaying) is True
    assert shares_budgets({}, decaying) is False  # MMGrowModule's default decays
    with pytest.raises(ValueError, match="constant learning rate"):
        shares_budgets({}, grid(set={}, share_budgets=True))


@pytest.mark.parametrize("change, message", [
    ({"lr": []}, "'lr' must be a non-empty list"),
    ({"lr": [1e-3, -1]}, "'lr' must hold positive numbers"),
    ({"batch_size": [64.5]}, "'batch_size' must hold positive integers"),
    ({"tokens": [512, 512]}, "lists a value twice"),
    ({"sizes": {}}, "'sizes' must map preset names"),
    ({"sizes": {"a/b": {"model.dim": 8}}}, "size name 'a/b'"),
    ({"share_budgets": "yes"}, "share_budgets must be auto, true or false"),
    ({"learning_rate": [1e-3]}, "unknown grid key"),
    ({"set": {"model.dim": 8}}, "size 's16' and 'set' both give model.dim"),
])
def test_bad_grids_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        grid(**change)


def test_missing_grid_keys_and_uneven_steps_are_named():
    with pytest.raises(ValueError, match=r"missing grid key\(s\) \['tokens'\]"):
        SweepGrid.from_dict({"sizes": {"a": {"model.dim": 8}}, "lr": [1e-3], "batch_size": [64]})
    with pytest.raises(ValueError, match="batch_size 48 tokens is not a whole number of samples of 32"):
        expand(grid(batch_size=[48]), 32, share=True)
    with pytest.raises(ValueError, match="token budget 256 is not a whole number of steps of 96"):
        expand(grid(batch_size=[96]), 32, share=True)


def test_fit_arguments_replay_the_overrides(tmp_path):
    run = expand(grid(set={"model.min_lr_ratio": 1.0, "data.dataset_args": {"frames": 2}}), 32, share=True)[0]
    args = fit_arguments("base.yaml", run, tmp_path)
    assert args[:3] == ["fit", "--config", "base.yaml"]
    pairs = dict(zip(args[3::2], args[4::2]))
    assert pairs["--model.dim"] == "16" and pairs["--model.lr"] == "0.001"
    assert yaml.safe_load(pairs["--data.dataset_args"]) == {"frames": 2}
    assert pairs["--trainer.check_val_every_n_epoch"] == "null"
    assert pairs["--trainer.default_root_dir"] == str(tmp_path / run.name)
    assert "--ckpt_path" not in args and fit_arguments("b", run, tmp_path, "x.ckpt")[-2:] == ["--ckpt_path", "x.ckpt"]


def _plan(tmp_path, g):
    plan = {"mmgrow_sweep": 1, "base": str(QUICK), "grid": {}, "tokens_per_sample": 32, "share_budgets": True,
            "sizes": {s: {"non_embedding": 100, "embedding": 1, "flops_per_token": 600.0} for s in g.sizes},
            "runs": [r.to_dict() for r in expand(g, 32, True)], "sessions": []}
    write_plan(tmp_path, plan)
    return plan


def _seal(directory: Path, status: str) -> None:
    (directory / "manifest.json").write_text(json.dumps({"status": status}))


def test_launchers_cover_the_unfinished_runs_and_resume(tmp_path):
    g = grid()
    plan = _plan(tmp_path, g)
    runs = expand(g, 32, True)
    record = json.loads((tmp_path / "runs" / runs[0].name / "scaling.json").read_text())
    assert record == {"budgets": [256, 512], "size": "s16", "lr": 1e-3, "batch_size": 64, "params": 100, "seed": 0}
    _seal(tmp_path / "runs" / runs[0].name, "complete")
    _seal(tmp_path / "runs" / runs[1].name, "diverged")
    partial = tmp_path / "runs" / runs[2].name / "checkpoints"
    partial.mkdir(parents=True)
    (partial / "last.ckpt").write_bytes(b"x")
    assert [run_state(tmp_path / "runs" / r.name) for r in runs[:4]] == ["complete", "diverged", "partial", "new"]

    slurm = launch.write_slurm(QUICK, "grid.yaml", runs, tmp_path, ["--gres=gpu:1"]).read_text()
    assert f"#SBATCH --array=0-{len(runs) - 3}" in slurm and "#SBATCH --gres=gpu:1" in slurm
    names = shlex.split(slurm.split("RUNS=(")[1].split(")")[0])
    assert names == [r.name for r in runs[2:]]
    assert '--only "${RUNS[$SLURM_ARRAY_TASK_ID]}"' in slurm

    lines = [ln for ln in launch.write_torchrun(QUICK, runs, tmp_path, nproc=2).read_text().splitlines()
             if ln.startswith("torchrun")]
    assert len(lines) == len(runs) - 2
    assert f"--ckpt_path {partial.resolve() / 'last.ckpt'}" in lines[0] and "--ckpt_path" not in lines[1]
    assert all("--trainer.devices $NPROC --trainer.strategy ddp" in ln and "|| echo" in ln for ln in lines)
    assert plan["runs"][0]["name"] == runs[0].name


def test_run_one_resumes_skips_and_classifies_exit_codes(tmp_path, monkeypatch):
    g = grid()
    _plan(tmp_path, g)
    runs = expand(g, 32, True)
    root, logs = tmp_path / "runs", tmp_path / "logs"
    calls = []

    def fake_call(cmd, stdout, stderr, env):
        calls.append(cmd)
        directory = Path(cmd[cmd.index("--trainer.default_root_dir") + 1])
        if "0.002" in directory.name:
            _seal(directory, "diverged")
            return 3
        print("Traceback ... ValueError: something broke", file=stdout)
        return 1

    monkeypatch.setattr(launch.subprocess, "call", fake_call)
    (root / runs[0].name / "checkpoints").mkdir()
    (root / runs[0].name / "checkpoints" / "last.ckpt").write_bytes(b"x")
    failed = launch.run_one(QUICK, runs[0], root, logs)
    assert failed.status == "failed" and "exit status 1" in failed.detail and "something broke" in failed.detail
    assert calls[0][-2:] == ["--ckpt_path", str(root / runs[0].name / "checkpoints" / "last.ckpt")]
    assert launch.run_one(QUICK, runs[2], root, logs).status == "diverged"  # lr 0.002
    _seal(root / runs[1].name, "complete")
    assert launch.run_one(QUICK, runs[1], root, logs).status == "skipped-complete"
    assert launch.run_one(QUICK, runs[2], root, logs).status == "skipped-diverged"
    assert len(calls) == 2
    # a failing run does not stop the others: every run of the list gets an outcome
    outcomes = launch.run_local(QUICK, runs[4:8], root, logs)
    assert sorted(o.status for o in outcomes) == ["diverged", "diverged", "failed", "failed"]


@pytest.mark.slow
def test_a_real_sweep_runs_resumes_and_survives_a_failing_size(tmp_path, capsys):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "sizes": {"ok": {"model.dim": 16, "model.depth": 1, "model.modulation.cond_dim": 16},
                  "broken": {"model.dim": 16, "model.depth": 0}},
        "lr": [3e-3], "batch_size": [128], "tokens": [256, 512], "set": TINY_SET}))
    out = tmp_path / "sweep"
    args = ["--config", str(DIT_BASE), "--grid", str(grid_file), "--out", str(out)]
    with pytest.raises(ValueError, match="depth"):  # measuring the broken size fails before anything runs
        sweep_main(args)
    assert not (out / "runs").exists()
    grid_file.write_text(grid_file.read_text().replace("model.depth: 0", "model.depth: 1"))
    assert sweep_main(args) == 0
    run = out / "runs" / "ok" / "lr0.003_bs128_s0"
    summary = json.loads((run / "summary.json").read_text())
    assert [h["tokens"] for h in summary["val_history"]] == [256, 512]  # validated exactly at both budgets
    assert summary["batch_size_tokens"] == 128 and summary["global_step"] == 4
    assert summary["lr"] == 3e-3 and summary["lr_schedule"]["kind"] == "constant"
    plan = json.loads((out / "sweep.json").read_text())
    assert plan["tokens_per_sample"] == 64  # measured: 4 frames x 16 latents
    assert plan["sizes"]["ok"]["non_embedding"] == summary["non_embedding_parameters"]
    assert json.loads((run / "scaling.json").read_text())["params"] == summary["non_embedding_parameters"]
    assert sweep_main(args) == 0  # again: nothing left to run
    assert "skipped-complete" in capsys.readouterr().out
    assert [o["status"] for o in json.loads((out / "sweep.json").read_text())["sessions"][-1]["outcomes"].values()] \
        == ["skipped-complete", "skipped-complete"]


def test_a_different_sweep_in_the_same_directory_is_refused(tmp_path):
    g = grid(sizes={"s16": {"model.dim": 16}})
    plan = _plan(tmp_path, g)
    plan["runs"][0]["overrides"]["model.lr"] = 5.0
    (tmp_path / "sweep.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="holds a different sweep"):
        make_plan(QUICK, g, tmp_path)
