"""``mmgrow ablate`` planning: variants x grid x seeds, --set last, parse errors, the plan and the launchers."""

import json
import shlex
from pathlib import Path

import pytest
import yaml

from mmgrow.ablation.cli import ablate_main, make_plan
from mmgrow.ablation.plan import AblationRun, expand, grid_points, write_plan
from mmgrow.ablation.variants import AblationSpec, parse_seeds, parse_set, parse_variants, parse_vary, read_variants
from mmgrow.scaling import launch

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"
MAMBA = {"class_path": "mamba2", "init_args": {"headdim": 8}}


def spec(**over):
    data = {"variants": {"full": {}, "mamba2": {"model.mixer": MAMBA, "model.depth": 3}},
            "vary": {"model.dim": [32, 64], "model.depth": [1, 2]}, "set": {"model.depth": 5, "data.num_train": 32},
            "seeds": [0, 3]}
    data.update(over)
    return AblationSpec(**data)


def test_variants_grid_and_seeds_expand_exactly_as_declared():
    runs = expand(spec())
    assert len(runs) == 2 * 4 * 2
    assert [r.name for r in runs[:8]] == [f"full/dim-{d}_depth-{e}/s{s}" for d in (32, 64) for e in (1, 2)
                                          for s in (0, 3)]
    assert runs[8].name == "mamba2/dim-32_depth-1/s0" and runs[8].variant == "mamba2/dim-32_depth-1"
    # order: variant, grid point, --set (wins), seed; a key set again moves to the end so it is replayed last
    assert list(runs[8].overrides.items()) == [("model.mixer", MAMBA), ("model.dim", 32), ("model.depth", 5),
                                               ("data.num_train", 32), ("seed_everything", 0)]
    assert runs[1].overrides == {"model.dim": 32, "model.depth": 5, "data.num_train": 32, "seed_everything": 3}
    assert {r.seed for r in runs} == {0, 3}


def test_without_variants_or_grid_there_is_one_base_run_per_seed():
    runs = expand(AblationSpec(seeds=[7]))
    assert [(r.name, r.variant, r.overrides) for r in runs] == [("base/s7", "base", {"seed_everything": 7})]
    assert grid_points({}) == [("", {})]


def test_matched_widths_come_after_set():
    runs = expand(spec(vary={}, seeds=[0]), widths={"mamba2": {"model.dim": 56}})
    assert runs[1].overrides == {"model.mixer": MAMBA, "model.depth": 5, "data.num_train": 32, "model.dim": 56,
                                 "seed_everything": 0}
    assert "model.dim" not in runs[0].overrides


def test_command_line_values_are_yaml_scalars():
    assert parse_vary(["model.lr=1e-3,3.0e-3", "model.mixer.init_args.window=16,32"]) == {
        "model.lr": [0.001, 0.003], "model.mixer.init_args.window": [16, 32]}
    assert parse_set(["trainer.max_steps=4", "data.dataset_args={frames: 2}", "model.norm=rms",
                      "trainer.max_steps=6"]) == {"trainer.max_steps": 6, "data.dataset_args": {"frames": 2},
                                                  "model.norm": "rms"}
    assert parse_seeds("3", 0) == [0, 1, 2] and parse_seeds("0,3", 0) == [0, 3] and parse_seeds(None, 5) == [5]
    assert [p for p, _ in grid_points({"model.lr": [0.001, 0.0005]})] == ["lr-0.001", "lr-0.0005"]
    vary = parse_vary(["model.mixer.init_args.num_kv_heads=null,1"])
    assert vary == {"model.mixer.init_args.num_kv_heads": [None, 1]}
    assert [p for p, _ in grid_points(vary)] == ["num_kv_heads-None", "num_kv_heads-1"]


@pytest.mark.parametrize("call, message", [
    (lambda: parse_variants({"a b": {}}), "variant name 'a b' is not a safe directory name"),
    (lambda: parse_variants({"../x": {}}), "not a safe directory name"),
    (lambda: parse_variants({"v": {"modle.dim": 8}}), "variant 'v': unknown recipe section 'modle' in key"),
    (lambda: parse_variants({"v": {"model.dim": 8, "trainr.max_steps": 2}}), "variant 'v'.*'trainr'"),
    (lambda: parse_variants({"v": [1, 2]}), "variant 'v' must map dotted keys to values"),
    (lambda: parse_variants({"v": {"seed_everything": 3}}), "seeds come from --seeds"),
    (lambda: parse_variants([]), "must be a non-empty mapping"),
    (lambda: parse_vary(["model.dim"]), "expected KEY=VALUE"),
    (lambda: parse_vary(["model.dim=8,8"]), "listed twice"),
    (lambda: parse_vary(["model.dim=8", "model.dim=16"]), "given twice"),
    (lambda: parse_vary(["model.dim=8,"]), "empty value"),
    (lambda: parse_vary(["model.x=a/b"]), "not a safe directory name"),
    (lambda: parse_set(["foo.bar=1"]), "unknown recipe section 'foo'"),
    (lambda: parse_set(["seed_everything=1"]), "use --seeds"),
    (lambda: parse_seeds("0", 0), "at least 1"),
    (lambda: parse_seeds("a,b", 0), "expected a count K"),
    (lambda: parse_seeds("1,1", 0), "lists a seed twice"),
    (lambda: grid_points({"model.dim": [8], "model.mixer.init_args.dim": [8]}), "share the short name"),
])
def test_parse_errors_name_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_variants_file_and_budget_warning(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("full:\nlong:\n  trainer.max_steps: 9\n")
    variants = read_variants(path)
    assert variants == {"full": {}, "long": {"trainer.max_steps": 9}}
    assert AblationSpec(variants=variants).warnings() == [
        "variant 'long' sets trainer.max_steps = 9: not the same budget as the other variants"]
    assert spec().warnings() == ["variant 'mamba2' sets model.depth = 3, but --vary model.depth overrides it"]
    assert AblationSpec(variants={"v": {"data.batch_size": 4}}, set={"data.batch_size": 8}).warnings() == [
        "variant 'v' sets data.batch_size = 4, but --set data.batch_size overrides it"]


def test_dry_run_prints_every_run_and_override_and_writes_nothing(tmp_path, capsys):
    variants = tmp_path / "v.yaml"
    variants.write_text(yaml.safe_dump({"full": {}, "swa": {"model.mixer": {"class_path": "sliding_window"}}}))
    out = tmp_path / "abl"
    code = ablate_main(["--config", str(QUICK), "--out", str(out), "--variants", str(variants),
                        "--vary", "model.depth=1,2", "--set", "model.dim=32", "--seeds", "2", "--dry-run"])
    assert code == 0 and not out.exists()
    text = capsys.readouterr().out
    assert "8 runs (2 variants x 2 grid points x 2 seeds)" in text
    rows = [line.split() for line in text.splitlines()[2:]]
    assert [r[0] for r in rows] == [f"{v}/depth-{d}/s{s}" for v in ("full", "swa") for d in (1, 2) for s in (0, 1)]
    assert rows[4] == ["swa/depth-1/s0", "swa/depth-1", "0", "model.mixer={class_path:", "sliding_window}",
                       "model.depth=1", "model.dim=32"]


def _plan(out: Path, s: AblationSpec) -> dict:
    plan = make_plan(QUICK, s, out, match=None)
    write_plan(out, plan)
    return plan


def test_plan_records_and_a_changed_ablation_is_refused(tmp_path):
    out = tmp_path / "abl"
    plan = _plan(out, spec())
    assert plan["seeds"] == [0, 3] and plan["vary"] == {"model.dim": [32, 64], "model.depth": [1, 2]}
    record = json.loads((out / "runs" / "mamba2/dim-64_depth-2/s3" / "ablation_run.json").read_text())
    assert record == {"variant": "mamba2/dim-64_depth-2", "seed": 3, "ablation": str(out.resolve()),
                      "overrides": {"model.mixer": MAMBA, "model.dim": 64, "model.depth": 5, "data.num_train": 32,
                                    "seed_everything": 3}}
    assert json.loads((out / "ablation.json").read_text())["runs"][0]["name"] == "full/dim-32_depth-1/s0"
    make_plan(QUICK, spec(), out, match=None)  # the same ablation again: fine (resume)
    with pytest.raises(ValueError, match=r"holds a different ablation: run full/dim-32_depth-1/s0 .*"
                                         r"\(data.num_train: 32 -> 64\); use a new --out"):
        make_plan(QUICK, spec(set={"model.depth": 5, "data.num_train": 64}), out, match=None)


def _seal(directory: Path, status: str) -> None:
    (directory / "manifest.json").write_text(json.dumps({"status": status}))


def test_slurm_and_torchrun_scripts_list_only_unfinished_runs(tmp_path, capsys):
    out = tmp_path / "abl"
    variants = tmp_path / "v.yaml"
    variants.write_text(yaml.safe_dump({"full": {}, "mamba2": {"model.mixer": MAMBA}}))
    args = ["--config", str(QUICK), "--out", str(out), "--variants", str(variants), "--seeds", "2",
            "--set", "model.dim=32"]
    runs = [f"{v}/s{s}" for v in ("full", "mamba2") for s in (0, 1)]
    for name in runs:
        (out / "runs" / name).mkdir(parents=True)
    _seal(out / "runs" / runs[0], "complete")
    _seal(out / "runs" / runs[1], "diverged")
    (out / "runs" / runs[2] / "checkpoints").mkdir()
    (out / "runs" / runs[2] / "checkpoints" / "last.ckpt").write_bytes(b"x")

    assert ablate_main([*args, "--launcher", "slurm", "--sbatch=--gres=gpu:1"]) == 0
    slurm = (out / "launch" / "ablate.sbatch").read_text()
    assert shlex.split(slurm.split("RUNS=(")[1].split(")")[0]) == runs[2:]
    assert "#SBATCH --array=0-1" in slurm and "#SBATCH --gres=gpu:1" in slurm
    task = shlex.split(slurm.splitlines()[-1])
    assert task[1:4] == [task[1], "-m", "mmgrow"] and task[4] == "ablate" and task[-2] == "--only"
    assert task[task.index("--seeds") + 1] == "2" and task[task.index("--set") + 1] == "model.dim=32"
    assert task[task.index("--variants") + 1] == str(variants.resolve())

    assert ablate_main([*args, "--launcher", "torchrun"]) == 0
    lines = [ln for ln in (out / "launch" / "torchrun.sh").read_text().splitlines() if ln.startswith("torchrun")]
    assert len(lines) == 2
    assert f"--ckpt_path {(out / 'runs' / runs[2] / 'checkpoints' / 'last.ckpt').resolve()}" in lines[0]
    assert "--ckpt_path" not in lines[1] and f"--trainer.default_root_dir {(out / 'runs' / runs[3]).resolve()}" \
        in lines[1]
    assert "--model.mixer '{class_path: mamba2, init_args: {headdim: 8}}'" in lines[1]
    for name in runs[2:]:
        _seal(out / "runs" / name, "complete")
    (out / "launch" / "ablate.sbatch").unlink()
    assert ablate_main([*args, "--launcher", "slurm"]) == 0
    assert not (out / "launch" / "ablate.sbatch").exists()
    assert "nothing to launch" in capsys.readouterr().out


def test_only_picks_one_run_and_names_a_wrong_one(tmp_path):
    out = tmp_path / "abl"
    with pytest.raises(ValueError, match="--only 'nope': no such run .* runs are e.g. base/s0"):
        ablate_main(["--config", str(QUICK), "--out", str(out), "--only", "nope"])
    assert AblationRun("a/s0", "a", 0).record(out) == {"variant": "a", "seed": 0, "overrides": {},
                                                       "ablation": str(out)}


def test_launchers_accept_any_named_run_with_overrides(tmp_path):
    run = AblationRun("v/s1", "v", 1, {"model.dim": 16, "seed_everything": 1})
    path = launch.write_array_job(["mmgrow", "ablate", "--out", "X"], [run], tmp_path, job="ablate")
    assert path.name == "ablate.sbatch" and "RUNS=(v/s1)" in path.read_text()
    assert "#SBATCH --job-name=mmgrow-ablate" in path.read_text()


def test_the_example_variants_file_plans_three_mixers(capsys):
    variants = read_variants(ROOT / "sweeps" / "example_ablation.yaml")
    assert list(variants) == ["full", "sliding_window", "mamba2"] and variants["full"] == {}
    assert {v["model.mixer"]["class_path"] for k, v in variants.items() if k != "full"} == {"sliding_window", "mamba2"}
    assert ablate_main(["--config", str(QUICK), "--out", "unused", "--variants",
                        str(ROOT / "sweeps" / "example_ablation.yaml"), "--seeds", "2", "--dry-run"]) == 0
    assert "6 runs (3 variants x 1 grid points x 2 seeds)" in capsys.readouterr().out
