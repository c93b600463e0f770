"""Tests for the crash-safe writers: a failed write never leaves a mixture behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from alzstage.files import (
    atomic_dir,
    atomic_path,
    md5_tree,
    read_json,
    sha256_file,
    write_json,
    write_text,
)


class Boom(RuntimeError):
    pass


def test_atomic_path_failure_keeps_target_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise Boom
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_path_failure_without_previous_target(tmp_path: Path) -> None:
    with pytest.raises(Boom), atomic_path(tmp_path / "sub" / "new.txt") as tmp:
        tmp.write_text("x")
        raise Boom
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_success_replaces_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_write_json_is_sorted_and_handles_numpy(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    write_json(target, {"b": np.float32(0.5), "a": np.arange(3), "p": Path("x/y")})
    assert target.read_text().index('"a"') < target.read_text().index('"b"')
    assert read_json(target) == {"a": [0, 1, 2], "b": 0.5, "p": "x/y"}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(target, {"x": object()})
    assert read_json(target)["b"] == 0.5  # the failed write left the old file


def test_atomic_dir_failure_keeps_old_dir(tmp_path: Path) -> None:
    target = tmp_path / "raw"
    (target / "images").mkdir(parents=True)
    (target / "manifest.csv").write_text("old")
    with pytest.raises(Boom), atomic_dir(target) as staging:
        (staging / "manifest.csv").write_text("partial")
        raise Boom
    assert (target / "manifest.csv").read_text() == "old"
    assert (target / "images").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_atomic_dir_failure_without_previous_dir(tmp_path: Path) -> None:
    with pytest.raises(Boom), atomic_dir(tmp_path / "raw") as staging:
        (staging / "a").write_text("x")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_success_swaps_whole_dir(tmp_path: Path) -> None:
    target = tmp_path / "raw"
    target.mkdir()
    (target / "stale.jpg").write_text("old")
    with atomic_dir(target) as staging:
        (staging / "fresh.jpg").write_text("new")
        assert not (target / "fresh.jpg").exists()  # nothing visible before the end
    assert sorted(p.name for p in target.iterdir()) == ["fresh.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


def test_atomic_dir_survives_a_stale_old_dir(tmp_path: Path) -> None:
    """A crash between the two renames of an earlier run (same pid) left ``.raw.old-<pid>``."""
    target = tmp_path / "raw"
    target.mkdir()
    stale = tmp_path / f".raw.old-{os.getpid()}"
    (stale / "junk").mkdir(parents=True)
    with atomic_dir(target) as staging:
        (staging / "ok").write_text("1")
    assert (target / "ok").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_hashes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    before = md5_tree(tmp_path / "d")
    assert sha256_file(tmp_path / "d" / "a.txt") == (
        "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
    )
    (tmp_path / "d" / "a.txt").write_text("b")
    assert md5_tree(tmp_path / "d") != before
    assert md5_tree(tmp_path / "d" / "a.txt") == "92eb5ffee6ae2fec3ad71c777531578f"
