"""Process lifetime: workers die with their parent, and write only while their run holds its output.

Worker side. `die_with_parent` is the initializer of every local worker process: Linux's
`PR_SET_PDEATHSIG` has the kernel send SIGKILL to the worker when its parent dies (also by
`kill -9`), and a watch thread that polls the parent's pid does the same where prctl is not
available. It also leaves SIGINT to the parent (a terminal's Ctrl-C reaches the whole process
group: the parent stops the workers itself, without a traceback from each) and gives SIGTERM and
SIGHUP back their default action. A worker's writes go through `atomic.atomic_path`, which asks
`check_writer` before its final rename: a local worker writes only while its parent is alive (the
parent holds the output lock for as long as it runs), a Dask task only while the output lock is held
by the run that submitted it (`RunGuard`), so a task that outlives its client renames nothing.

Parent side. `stop_on_signals` (a context) makes SIGTERM and SIGHUP (and SIGINT) kill every descendant
process at once and raise `Interrupted`, which unwinds the run (its lock released, its temporary
files removed) and which the `cpia` entry point reports in one line.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RESUME_HINT = "rerun the same command to resume"
_local = threading.local()  # the write check of the task running in this thread (Dask tasks)
_process_check: Callable[[], None] | None = None  # the write check of this worker process (local pool)


class Interrupted(BaseException):
    """The run was stopped by a signal (Ctrl-C, SIGTERM, SIGHUP); its workers are already killed.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` of a job swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP

    def __str__(self) -> str:
        if self.signum == signal.SIGINT:
            return f"interrupted; {RESUME_HINT}"
        return f"stopped by {signal.Signals(self.signum).name}; {RESUME_HINT}"


class OrphanedWriter(OSError):
    """A worker whose run is gone (parent dead, output lock released or taken by another run) tried to write."""


# --- worker side -------------------------------------------------------------------------------------------


def die_with_parent() -> None:
    """Initializer of a worker process: SIGKILL when the parent dies; SIGINT ignored, SIGTERM/SIGHUP default."""
    global _process_check
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    killed_with_parent(parent)
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    _process_check = lambda: _require_parent(parent)  # noqa: E731


def killed_with_parent(parent: int) -> None:
    """In a child of `parent`: ask the kernel for SIGKILL when the parent dies, and exit now if it already has
    (between the fork and the request). The one place both the conversion's workers and the DataLoader's
    workers (`cpia_hf.model.workers`) tie their life to their parent's."""
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _set_parent_death_signal(signum: int) -> bool:
    """Linux prctl(PR_SET_PDEATHSIG); False where it is not available (the watch thread still runs)."""
    try:
        import ctypes  # only a worker process asks the kernel; the run's start-up does not load it

        libc = ctypes.CDLL(None, use_errno=True)  # this process's own symbols, libc's included
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def _require_parent(parent: int) -> None:
    if os.getppid() != parent:
        raise OrphanedWriter(f"the run that started this worker (pid {parent}) is gone; nothing written")


@dataclass(frozen=True)
class RunGuard:
    """What a task on another machine checks before it writes: the run's lock file, held, by this owner."""

    lock_path: str
    owner: str  # the text of the lock's owner record written by the run

    def check(self) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(self.lock_path, timeout=0)
        try:
            lock.acquire()
        except Timeout:  # held by someone: by this run if the owner record is still this run's
            if _read_text(Path(self.lock_path + ".owner")) == self.owner:
                return
            raise OrphanedWriter(f"{self.lock_path}: the output is now held by another run; nothing written") from None
        lock.release()
        raise OrphanedWriter(f"{self.lock_path}: the run that submitted this task has ended; nothing written")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@contextmanager
def guarded_by(guard: RunGuard | None) -> Iterator[None]:
    """Writes in this thread during the block are checked against `guard` (a Dask task of a run)."""
    previous = getattr(_local, "guard", None)
    _local.guard = guard
    try:
        yield
    finally:
        _local.guard = previous


def check_writer() -> None:
    """Raise OrphanedWriter when this process or task writes for a run that no longer holds the output."""
    guard = getattr(_local, "guard", None)
    if guard is not None:
        guard.check()
    if _process_check is not None:
        _process_check()


# --- run side ----------------------------------------------------------------------------------------------

_current_guard: RunGuard | None = None  # the output lock this process holds, for its remote tasks


def holding_output(lock_path: Path, owner: dict) -> str:
    """Record that this process holds `lock_path` as `owner`; returns the owner record's text to write."""
    global _current_guard
    text = json.dumps(owner)
    _current_guard = RunGuard(str(lock_path), text)
    return text


def released_output() -> None:
    global _current_guard
    _current_guard = None


def current_guard() -> RunGuard | None:
    """The guard that tasks submitted by this run carry (None outside a run holding an output lock)."""
    return _current_guard


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """In the main thread, for the block: SIGINT, SIGTERM and SIGHUP kill all descendants and raise Interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(signum: int, _frame) -> None:
    for signum_ in STOP_SIGNALS:  # a second signal does not interrupt the unwinding
        signal.signal(signum_, signal.SIG_IGN)
    kill_descendants()
    raise Interrupted(signum)


def kill_descendants() -> list[int]:
    """SIGKILL every process started by this one (workers, their children); returns their pids."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for child in children:  # not waited for here: the pool that started them reaps them as it unwinds
        try:
            child.kill()
        except psutil.Error:
            pass
    return [child.pid for child in children]
