"""The output folder's lock: one `cpia convert` at a time writes a dataset folder.

The lock is an OS file lock (`filelock`) on `<out>/.work/convert.lock`, released by the OS when its
holder dies, so a crashed run never leaves a stale lock. Next to it the holder records who it is
(pid, host, start time), which a second run prints before it exits. Holding the lock, a run also
removes, when it starts and when it ends, the temporary files (`*.tmp<pid>`) that a killed run or a
killed worker process left in the folder.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from ..atomic import TEMP_GLOB, OutputError, output_errors, write_atomic
from ..lifetime import holding_output, released_output
from .units import read_record

LOCK_FILE = ".work/convert.lock"  # its `.work` folder also marks an output folder (sources.OutputFolders)


class OutputLocked(OutputError):
    """Another run holds the output folder's lock; str() says who."""


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the lock of `out_dir` for the block, or raise OutputLocked naming the holder."""
    lock_path = out_dir / LOCK_FILE
    owner_path = lock_path.with_name(lock_path.name + ".owner")
    with output_errors(lock_path):
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OutputLocked(str(out_dir), f"locked by another cpia convert ({_holder(owner_path)})") from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        write_atomic(owner_path, holding_output(lock_path, owner).encode())  # what this run's Dask tasks check
        remove_temp_files(out_dir)
        yield
    finally:
        released_output()
        remove_temp_files(out_dir)  # left by workers that were killed or aborted during this run
        lock.release()


def _holder(owner_path: Path) -> str:
    owner = read_record(owner_path)
    if not owner:
        return "holder unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"


def remove_temp_files(out_dir: Path) -> list[Path]:
    """Remove temporary files left in `out_dir` by a killed run (only call with the lock held)."""
    removed = []
    for path in out_dir.rglob(TEMP_GLOB):
        with suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed
