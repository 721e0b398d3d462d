"""Sharded checkpoint directories: atomic replacement, recovery after a crash between the renames, and
the structural check a resume runs first (no processes needed: the files are laid out by hand)."""

import pytest

from mmgrow.parallel.distributed_checkpoint import is_complete, replace_directory, settle, sibling
from mmgrow.rundir import CheckpointError, check_checkpoint_file


def _checkpoint(path, step: int, complete: bool = True):
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_text(f"shard of step {step}")
    if complete:
        (path / ".metadata").write_text("index")
        (path / "meta.pt").write_text(f"step {step}")
    return path


def test_replace_swaps_in_the_new_directory_and_leaves_nothing_behind(tmp_path):
    last = _checkpoint(tmp_path / "last.ckpt", 1)
    new = _checkpoint(sibling(last, ".partial"), 2)
    replace_directory(new, last)
    assert (last / "meta.pt").read_text() == "step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("left, expected", [((".partial", ".old"), "step 2"), ((".old",), "step 1")])
def test_settle_recovers_the_newest_complete_checkpoint_after_a_crash_between_renames(tmp_path, left, expected):
    last = tmp_path / "last.ckpt"
    steps = {".partial": 2, ".old": 1}
    for suffix in left:
        _checkpoint(sibling(last, suffix), steps[suffix])
    assert check_checkpoint_file(last) == last  # settles first
    assert (last / "meta.pt").read_text() == expected


def test_an_incomplete_partial_is_never_promoted(tmp_path):
    last = tmp_path / "last.ckpt"
    _checkpoint(sibling(last, ".partial"), 2, complete=False)  # crashed while writing shards
    _checkpoint(sibling(last, ".old"), 1)
    settle(last)
    assert (last / "meta.pt").read_text() == "step 1"


def test_check_refuses_an_incomplete_directory_naming_what_is_missing(tmp_path):
    last = _checkpoint(tmp_path / "last.ckpt", 3, complete=False)
    assert not is_complete(last)
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        check_checkpoint_file(last, what="--ckpt_path")
