"""``mmgrow ablate`` running here: resume (skip complete, resume partial), failing variants, the summary."""

import json
from pathlib import Path

import pytest
import yaml

from mmgrow.ablation.cli import ablate_main
from mmgrow.scaling import launch

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"
TINY = ["model.dim=32", "model.depth=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "data.num_train=32", "data.num_val=4", "model.warmup_steps=1"]


def _seal(directory: Path, status: str) -> None:
    (directory / "manifest.json").write_text(json.dumps({"status": status}))


def test_resume_skips_complete_resumes_partial_and_reports_failures(tmp_path, monkeypatch, capsys):
    """Fake fits (the subprocess is replaced): which runs start, with which checkpoint, and the exit status."""
    variants = tmp_path / "v.yaml"
    variants.write_text(yaml.safe_dump({"a": {}, "b": {"model.depth": 2}, "c": {"model.depth": 3}}))
    out = tmp_path / "abl"
    calls = []

    def fake_call(cmd, stdout, stderr, env):
        directory = Path(cmd[cmd.index("--trainer.default_root_dir") + 1])
        calls.append((directory.relative_to(out / "runs").as_posix(), cmd[cmd.index("--ckpt_path") + 1]
                      if "--ckpt_path" in cmd else None))
        assert (directory / "ablation_run.json").is_file()  # written before the run trains
        if directory.parent.name == "c":
            print("Traceback ...\nValueError: the mixer broke", file=stdout)
            return 1
        _seal(directory, "complete")
        return 0

    monkeypatch.setattr(launch.subprocess, "call", fake_call)
    args = ["--config", str(QUICK), "--out", str(out), "--variants", str(variants), "--seeds", "2"]
    assert ablate_main(args) == 1  # c failed; a and b still ran
    assert sorted(calls) == [(f"{v}/s{s}", None) for v in "abc" for s in (0, 1)]
    text = capsys.readouterr()
    assert "c/s0  failed" in text.out and "a/s1  complete" in text.out
    assert "failed: c/s0: exit status 1;" in text.err and "ValueError: the mixer broke" in text.err
    assert f"mmgrow report {out}" in text.out

    # interrupted: a/s1 left only a checkpoint; c still fails
    (out / "runs" / "a/s1" / "manifest.json").unlink()
    (out / "runs" / "a/s1" / "checkpoints").mkdir()
    (out / "runs" / "a/s1" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    calls.clear()
    assert ablate_main(args) == 1
    assert sorted(calls) == [("a/s1", str(out / "runs" / "a/s1" / "checkpoints" / "last.ckpt")),
                             ("c/s0", None), ("c/s1", None)]
    sessions = json.loads((out / "ablation.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["outcomes"]["a/s0"]["status"] == "skipped-complete"
    assert sessions[1]["outcomes"]["a/s1"] == {"status": "complete", "seconds": pytest.approx(0, abs=5),
                                               "detail": f"resumed from {out / 'runs' / 'a/s1/checkpoints/last.ckpt'}"}
    capsys.readouterr()

    # the fixed variant completes and the ablation exits 0
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, stdout, stderr, env: (
        _seal(Path(cmd[cmd.index("--trainer.default_root_dir") + 1]), "complete"), 0)[1])
    assert ablate_main(args) == 0
    assert "c/s1  complete" in capsys.readouterr().out


@pytest.mark.slow
def test_a_real_ablation_survives_a_bad_class_path_and_resumes(tmp_path, capsys):
    """Two tiny real fits (2 steps) and one variant whose mixer does not exist."""
    variants = tmp_path / "v.yaml"
    variants.write_text(yaml.safe_dump({"full": {}, "broken": {"model.mixer": {"class_path": "no_such_mixer"}}}))
    out = tmp_path / "abl"
    args = ["--config", str(QUICK), "--out", str(out), "--variants", str(variants)]
    for item in TINY:
        args += ["--set", item]
    assert ablate_main(args) == 1
    text = capsys.readouterr()
    assert "broken/s0: exit status 2" in text.err and "no_such_mixer" in text.err
    summary = json.loads((out / "runs" / "full/s0" / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["non_embedding_parameters"] > 0
    record = json.loads((out / "runs" / "full/s0" / "ablation_run.json").read_text())
    assert record["variant"] == "full" and record["overrides"]["model.dim"] == 32
    assert ablate_main([*args, "--only", "full/s0"]) == 0  # again: the complete run is skipped
    assert "full/s0  skipped-complete" in capsys.readouterr().out
