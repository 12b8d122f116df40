"""Atomic writes: whole or absent, and readable like any other saved file."""

from __future__ import annotations

import os
import stat

import pytest

from jaxpeft.core.atomic import atomic_dir, atomic_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_permissions_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "a.json") as f:
            f.write("{}")
        with atomic_dir(tmp_path / "folder") as d:
            fd = os.open(d / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors' writer does
            os.close(fd)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "folder" / "weights.bin") == 0o644
    assert _mode(tmp_path / "folder") == 0o755


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    with atomic_dir(tmp_path / "out") as d:
        (d / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out", overwrite=True) as d:
        (d / "x").write_text("new")
        raise RuntimeError("interrupted")
    assert (tmp_path / "out" / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
