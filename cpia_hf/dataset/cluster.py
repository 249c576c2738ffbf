"""Conversion on a Dask distributed cluster: `cpia convert --scheduler tcp://HOST:8786`.

The client (the `cpia convert` process) discovers the units, submits each unit and then each
subset's packing as a Dask task, shows one progress bar and prints the summary; the workers do
the work and write to the output folder, which must be a filesystem all workers share (NFS,
Lustre, GPFS, CephFS...). Tasks carry pure, stable keys (a hash of the function and its
arguments): a task resubmitted by a rerun, or rerun by the scheduler after its worker was lost,
is the same task and writes the same atomically renamed files, so nothing is duplicated and the
output is byte-identical to a local run. A task whose worker dies is rerun elsewhere by the
scheduler; after `distributed.scheduler.allowed-failures` deaths it is failed (KilledWorker) and
named in the summary while the rest finishes.

`DaskExecutor` satisfies the `executor.Executor` protocol: a task's outcome is an `Outcome`, and a task
given up after its workers died is a `WorkerKilled` worded like the local pool's. The lifetime of the
worker processes is Dask's (each `dask worker` has a nanny that stops its worker with it).

The cluster itself is started by Dask's own launchers (`dask scheduler` + `dask worker`,
dask-jobqueue, dask-kubernetes): see docs/cluster.md.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Sequence, TypeVar

from .. import __version__
from ..lifetime import RunGuard, current_guard, guarded_by
from .errors import ClusterError, WorkerKilled
from .executor import progress_bar
from .results import Outcome

logger = logging.getLogger(__name__)
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
CONNECT_TIMEOUT_S = 10.0  # a scheduler that does not answer within this is named at once, not after Dask's 30 s
CLOSE_TIMEOUT_S = 5.0
T = TypeVar("T")
__all__ = ["ClusterError", "DaskExecutor", "resolve_scheduler", "task_key"]


def resolve_scheduler(scheduler: str) -> str:
    """The scheduler address: `auto` reads DASK_SCHEDULER_ADDRESS, anything else is taken as given."""
    if scheduler != "auto":
        return scheduler
    address = os.environ.get(SCHEDULER_ENV, "").strip()
    if not address:
        raise ClusterError(f"--scheduler auto needs {SCHEDULER_ENV} (e.g. tcp://host:8786) in the environment")
    return address


def task_key(fn: Callable, args: tuple, desc: str) -> str:
    """Pure, stable key of `fn(*args)`: equal arguments give the same key in every process and run."""
    from dask.base import tokenize

    return f"cpia-{desc.replace(' ', '-')}-{tokenize(fn.__module__, fn.__qualname__, args)}"


def _run(fn: Callable[..., T], args: tuple, guard: RunGuard | None = None) -> Outcome[T]:
    """Runs on a worker: a Python error is returned (and logged there), as the local executor does. Its
    files are renamed into place only while the submitting run still holds the output lock (`guard`)."""
    try:
        with guarded_by(guard):
            return Outcome(fn(*args))
    except Exception as error:
        logger.exception("%s failed", fn.__name__)
        return Outcome(error=error)


def _worker_version() -> str:
    return __version__


def _rows(outcome: Outcome) -> int:
    """Rows of a task's output: a unit's row count (done now or before), or a packing's rows over its folders."""
    rows = getattr(outcome.value, "rows", 0)  # UnitResult or PackResult; 0 for a plan or a failed task
    return sum(rows.values()) if isinstance(rows, dict) else rows


class DaskExecutor:
    """The Executor of a Dask cluster: jobs run as its tasks (see the module docstring)."""

    def __init__(self, scheduler: str):
        self.address = resolve_scheduler(scheduler)
        self.client = None
        self._quiet = contextlib.ExitStack()

    def __enter__(self) -> "DaskExecutor":
        from distributed import Client

        self._quiet = _quiet_distributed()
        try:
            self.client = Client(self.address, set_as_default=False, timeout=connect_timeout())
        except (OSError, TimeoutError) as error:
            raise ClusterError(f"cannot reach the Dask scheduler at {self.address}: {error}") from error
        try:
            self._check_workers()
        except Exception:
            self.client.close()
            raise
        return self

    def _check_workers(self) -> None:
        versions = self.client.run(_worker_version)
        other = {worker: v for worker, v in versions.items() if v != __version__}
        if other:
            raise ClusterError(f"workers run another cpia-hf version than this client ({__version__}): {other}")
        if not versions:
            logger.warning("no worker connected to %s yet: the units wait for one", self.address)

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):  # also when the scheduler is gone
                self.client.close(timeout=CLOSE_TIMEOUT_S)
            self.client = None
        self._quiet.close()

    def map(self, fn: Callable[..., T], jobs: Sequence[tuple], desc: str, progress: bool) -> list[Outcome[T]]:
        """`fn(*args)` for every tuple on the cluster, in order."""
        from distributed import as_completed

        keys = [task_key(fn, args, desc) for args in jobs]
        guards = [current_guard()] * len(jobs)  # not part of the keys: a rerun's task is the same task
        futures = self.client.map(_run, [fn] * len(jobs), jobs, guards, key=keys, pure=True)
        index = {future.key: k for k, future in enumerate(futures)}
        results: list = [None] * len(futures)
        failed = rows = 0
        bar = progress_bar(len(futures), desc, progress)
        for future in _while_connected(as_completed(futures, loop=self.client.loop), self.client, self.address):
            result = _outcome(future)
            results[index[future.key]] = result
            failed += not result.ok
            rows += _rows(result)
            bar.set_postfix(failed=failed, rows=rows, refresh=False)
            bar.update()
            future.release()
        bar.close()
        return results


def connect_timeout() -> float:
    """Seconds to wait for the scheduler: distributed.comm.timeouts.connect, at most CONNECT_TIMEOUT_S."""
    import dask
    from dask.utils import parse_timedelta

    return min(CONNECT_TIMEOUT_S, parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))


def _quiet_distributed() -> contextlib.ExitStack:
    """Dask's own log lines (a lost connection logs tracebacks) hidden unless -v: the run says what failed in one
    line. Closing the returned stack restores the level."""
    import distributed  # noqa: F401  (its loggers exist, with the levels its configuration gives them)

    stack = contextlib.ExitStack()
    if logger.isEnabledFor(logging.INFO):
        return stack
    names = ["distributed"] + [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]
    for dask_logger in map(logging.getLogger, names):
        stack.callback(dask_logger.setLevel, dask_logger.level)
        dask_logger.setLevel(logging.CRITICAL)
    return stack


def _while_connected(completed, client, address: str):
    """The futures of `completed` as they finish; ClusterError naming the scheduler once the client has lost it
    (Dask cancels every future then, and would otherwise leave the run waiting)."""
    iterator = iter(completed)
    while True:
        try:
            future = next(iterator)
        except StopIteration:
            return
        if client.status != "running" or future.status == "cancelled":
            raise ClusterError(f"lost the connection to the Dask scheduler at {address} (scheduler stopped or "
                               "unreachable); rerun the same command to resume")
        yield future


def _outcome(future):
    """A finished future's result, or its error (KilledWorker explained).

    `result()` also waits for a task that the scheduler recomputes because the worker holding its
    result died after it finished.
    """
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker as error:
        last = getattr(error.last_worker, "address", error.last_worker)
        return Outcome(error=WorkerKilled(
            f"worker killed {error.allowed_failures + 1} times running it (distributed.scheduler.allowed-failures = "
            f"{error.allowed_failures}): probably out of memory or a crashing decoder; last worker {last}"))
    except Exception as error:  # e.g. a result that cannot be unpickled here
        return Outcome(error=error)
