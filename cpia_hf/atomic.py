"""Atomic output files: write to a temporary name next to the target, rename on success, remove on failure.

A reader (or a rerun, or `cpia push`) never sees a partial file: either the previous version or the
new one. Temporary files are named `<name>.tmp<pid>` (`TEMP_GLOB` matches them) and never survive a
failed write. An OS error while writing an output (disk full, read-only folder, permission) becomes
`OutputError`, which names the path and the error in one line.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from .lifetime import check_writer

TEMP_GLOB = "*.tmp[0-9]*"
FREE_SPACE_MARGIN = 16 * 1024 * 1024  # free bytes kept on the output's file system


class OutputError(Exception):
    """An output file could not be written; str() is one line: the path and the OS error."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"

    @classmethod
    def of(cls, path: Path, error: OSError) -> "OutputError":
        reason = f"[Errno {error.errno}] {os.strerror(error.errno)}" if error.errno else str(error)
        return cls(str(path), reason)


@contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Turn an OSError raised inside the block into an OutputError naming `path`."""
    try:
        yield
    except OSError as error:
        raise OutputError.of(path, error) from error


def require_free_space(path: Path, nbytes: int) -> None:
    """Raise OSError(ENOSPC) when the file system of `path` has fewer than `nbytes` free for this user.

    Used before large writes whose writer cannot fail cleanly (pyarrow 26's Parquet writer with
    content-defined chunking aborts the whole process, not an exception, when its file fails
    mid-page), and before work whose output would not fit, so that a full disk stops a run fast.
    """
    while not path.exists() and path != path.parent:  # the folder may not exist yet: ask its file system
        path = path.parent
    stat = os.statvfs(path)
    if stat.f_bavail * stat.f_frsize < nbytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; renamed to `path` when the block succeeds, removed when it fails.

    The caller writes the temporary file; wrap its write calls in `output_errors` so that an OS error
    names the output. Creating the folder and the final rename are covered here; a worker of a run that
has ended (see `cpia_hf.lifetime`) gets an OutputError instead of the rename.
    """
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with output_errors(path):
            check_writer()  # a worker whose run is gone (parent dead, lock released) renames nothing
            os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, output_errors(path):
        tmp.write_bytes(data)
