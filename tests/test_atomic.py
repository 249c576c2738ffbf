"""Atomic output files: the target appears whole or not at all, and no temporary file is left behind."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from cpia_hf.atomic import TEMP_GLOB, OutputError, atomic_path, output_errors, write_atomic


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_failed_block_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            assert list(tmp_path.glob(TEMP_GLOB)) == [tmp]
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.glob(TEMP_GLOB)) == []


def test_os_error_while_writing_names_the_output(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    with pytest.raises(OutputError) as caught:
        with atomic_path(target) as tmp, output_errors(target):
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == f"cannot write {target}: [Errno 28] No space left on device"
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_require_free_space(tmp_path: Path) -> None:
    from cpia_hf.atomic import require_free_space

    require_free_space(tmp_path, 1)
    with pytest.raises(OSError) as caught:
        require_free_space(tmp_path, 1 << 62)
    assert caught.value.errno == errno.ENOSPC
