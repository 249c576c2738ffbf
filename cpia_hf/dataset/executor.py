"""Execution of conversion jobs: the `Executor` protocol, and the local pool of worker processes that satisfies it.

An executor runs `fn(*args)` for every job and hands back one `Outcome` per job, in order: the job's
value, or the error that ended it (raised by the job, or `WorkerKilled` when its worker process died
each time it ran). It never raises for a job; the caller decides what a failed job costs. Two
executors satisfy it: `LocalExecutor` here (`--workers N`) and `cluster.DaskExecutor` (`--scheduler`).

Locally every job runs in a child process, also with one worker: a slide whose decoder segfaults or
whose memory gets the process killed by the kernel must not take the run down. Jobs go to a
`ProcessPoolExecutor` with at most `workers` of them in flight; within a `with` block every `map`
uses the same pool, so the workers start (and import what the jobs need) once per run, not once per
stage. When a worker dies the pool breaks (`BrokenProcessPool`) and every job in flight is a suspect.
The pool is rebuilt for the remaining jobs, and each suspect is retried once, alone in its own
process: a suspect that completes there was a bystander, one that dies again is the culprit and its
outcome is a `WorkerKilled` naming the signal.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import sys
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Protocol, Sequence, TypeVar, runtime_checkable

from ..atomic import OutputError
from ..lifetime import die_with_parent
from .errors import WorkerKilled
from .results import Outcome

logger = logging.getLogger(__name__)
T = TypeVar("T")
Initializer = Callable[[], None]


@runtime_checkable
class Executor(Protocol):
    """Runs jobs and hands back one Outcome per job, in order (see the module docstring); a context manager
    that holds its workers (processes, or a cluster connection) for the block."""

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc: object) -> None: ...

    def map(self, fn: Callable[..., T], jobs: Sequence[tuple], desc: str, progress: bool) -> list[Outcome[T]]:
        """`fn(*args)` for each tuple of `jobs`, with a progress bar named `desc` when `progress`."""
        ...


class _SilentBar:
    """The bar of a run without progress bars: it shows nothing, and such a run never imports tqdm."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **values: object) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm bar of `total` jobs on stderr, or a silent one without `progress`."""
    if not progress:
        return _SilentBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="unit", file=sys.stderr)


def death_reason(exitcode: int | None) -> str:
    """Words for a worker's exit code: `-N` is death by signal N."""
    if exitcode is None or exitcode >= 0:
        return f"worker exited with status {exitcode} without a result"
    number = -exitcode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    hint = {signal.SIGKILL: ", probably out of memory", signal.SIGSEGV: ", a crash in native code (decoder)",
            signal.SIGBUS: ", a crash in native code (decoder)", signal.SIGABRT: ", aborted by native code"}
    return f"worker killed, signal {number} ({name}){hint.get(number, '')}"


class LocalExecutor:
    """The Executor of `workers` local child processes; see the module docstring.

    `initializer` runs first in every worker process (the pool's and a suspect's own): the one place where
    a worker's lifetime is set up; by default `die_with_parent` (see cpia_hf.lifetime).
    """

    def __init__(self, workers: int, initializer: Initializer | None = die_with_parent):
        self.workers = max(1, workers)
        self.initializer = initializer
        self._held = False  # inside `with`: the pool is kept from one map to the next
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "LocalExecutor":
        self._held = True
        return self

    def __exit__(self, *exc) -> None:
        self._held = False
        self._close_pool()

    def _live_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, initializer=self.initializer)
        return self._pool

    def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable[..., T], jobs: Sequence[tuple], desc: str, progress: bool) -> list[Outcome[T]]:
        bar = progress_bar(len(jobs), desc, progress)
        results: list = [None] * len(jobs)
        suspects = self._run_pool(fn, jobs, results, bar)
        for index in suspects:
            logger.info("a worker died; retrying %s job %d alone", desc, index)  # the summary names the culprit
            results[index] = run_alone(fn, jobs[index], self.initializer)
            bar.update()
        bar.close()
        return results

    def _run_pool(self, fn: Callable, jobs: Sequence[tuple], results: list, bar) -> list[int]:
        """Run all jobs; returns the indexes of those in flight when a worker died (not yet done)."""
        todo = deque(range(len(jobs)))
        suspects: list[int] = []
        try:
            while todo:
                if self._run_until_broken(self._live_pool(), fn, jobs, todo, results, suspects, bar):
                    self._close_pool()  # the pool is gone: a new one for the jobs left
        finally:
            if not self._held:
                self._close_pool()
        return suspects

    def _run_until_broken(self, pool: ProcessPoolExecutor, fn: Callable, jobs: Sequence[tuple], todo: deque,
                          results: list, suspects: list[int], bar) -> bool:
        """Run jobs of `todo` on `pool` until none is left or a worker dies; True when it died."""
        running: dict[Future, int] = {}
        broken = False
        while (todo or running) and not broken:
            broken = not _fill(pool, fn, jobs, todo, running, self.workers)
            if broken or not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                broken |= _collect(future, running.pop(future), results, suspects, bar)
        if broken:  # every job in flight ends as broken (or already finished)
            wait(running)
            for future, index in running.items():
                _collect(future, index, results, suspects, bar)
        return broken


def _fill(pool: ProcessPoolExecutor, fn: Callable, jobs: Sequence[tuple], todo: deque, running: dict,
          limit: int) -> bool:
    """Submit jobs until `limit` are in flight; False when the pool turned out broken (the job stays to do)."""
    while todo and len(running) < limit:
        index = todo.popleft()
        try:
            running[pool.submit(_call, fn, jobs[index])] = index
        except BrokenProcessPool:
            todo.appendleft(index)
            return False
    return True


def _collect(future: Future, index: int, results: list, suspects: list[int], bar) -> bool:
    """Store a finished future's result; True when it broke with the pool."""
    try:
        results[index] = future.result()
    except BrokenProcessPool:
        suspects.append(index)
        return True
    bar.update()
    return False


def run_alone(fn: Callable[..., T], args: tuple, initializer: Initializer | None = None) -> Outcome[T]:
    """Run one job in a fresh child process: its outcome, WorkerKilled when the child dies."""
    context = multiprocessing.get_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, args, initializer), daemon=True)
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:  # the child died before sending anything
        result = None
    finally:
        receiver.close()
        process.join()
    if result is None:
        return Outcome(error=WorkerKilled(death_reason(process.exitcode)))
    return result


def _child(sender, fn: Callable, args: tuple, initializer: Initializer | None) -> None:
    if initializer is not None:
        initializer()
    sender.send(_call(fn, args))
    sender.close()


def _call(fn: Callable[..., T], args: tuple) -> Outcome[T]:
    """Run one job; an exception is returned (picklable), not raised, so it costs only this job."""
    try:
        return Outcome(fn(*args))
    except OutputError as error:  # the caller stops the run and prints it in one line
        return Outcome(error=error)
    except Exception as error:  # one unit's unexpected error must not stop the others
        logger.info("%s failed", getattr(fn, "__name__", fn), exc_info=True)  # the summary names it; -v: traceback
        return Outcome(error=_picklable(error))


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
