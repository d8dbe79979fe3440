"""femb.io: the one writer through temporary names (docs/architecture.md "Atomic output")."""

from __future__ import annotations

import errno
import os

import pytest

from femb.io import atomic_dir, atomic_path, remove_temps, temp_path, temp_target, write_json


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and temp_target(tmp.name) == "out.bin"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_atomic_dir_replaces_the_whole_directory_or_keeps_the_old_one(tmp_path):
    target = tmp_path / "models"
    target.mkdir()
    (target / "old.txt").write_text("old")

    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]

    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_remove_temps_deletes_only_temporaries_of_the_named_targets(tmp_path):
    write_json(tmp_path / "manifest.json", {"a": 1})
    stale_json = temp_path(tmp_path / "manifest.json")
    stale_json.write_text("{")
    stale_shard = temp_path(tmp_path / "train-00000-of-00001.parquet")
    stale_shard.write_bytes(b"PAR1")
    lookalike = tmp_path / ".manifest.json.tmp"  # not our rule: someone else's file
    lookalike.write_text("x")

    assert remove_temps(tmp_path, ["manifest.json"]) == [stale_json]
    assert stale_shard.exists()
    assert remove_temps(tmp_path) == [stale_shard]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".manifest.json.tmp", "manifest.json"]


def test_temp_target_recognises_only_the_temp_name_rule():
    assert temp_target(".train.rec.123-0a1b2c3d.tmp") == "train.rec"
    assert temp_target(".train.rec.deadbeef.tmp") is None
    assert temp_target("train.rec") is None


def test_atomic_path_names_the_target_when_a_write_error_names_no_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as raised, atomic_path(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a buffered write on a full disk raises
    assert raised.value.filename == str(target) and raised.value.errno == errno.ENOSPC
    assert raised.value.strerror.endswith("(the disk is full: free space or write elsewhere)")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_names_a_disk_error_another_error_was_raised_from(tmp_path):
    target = tmp_path / "w.pth"
    with pytest.raises(OSError) as raised, atomic_path(target):
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError:
            raise RuntimeError("file write failed") from None  # as torch.save reports it (context kept)
    assert raised.value.filename == str(target) and isinstance(raised.value.__cause__, RuntimeError)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_errors_that_name_another_file_or_are_not_about_disks(tmp_path):
    missing = tmp_path / "input.txt"
    with pytest.raises(FileNotFoundError) as raised, atomic_path(tmp_path / "out.txt"):
        missing.read_text()
    assert raised.value.filename == str(missing)
    with pytest.raises(RuntimeError, match="a bug"), atomic_path(tmp_path / "out.txt"):
        raise RuntimeError("a bug")
    assert list(tmp_path.iterdir()) == []
