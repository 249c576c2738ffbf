"""DataLoader workers that pre-training and evaluation share: as many as the machine gives, and none that
outlives the process that started it.

torch's own worker loop notices a dead parent only when its queue poll times out (every few seconds,
and not while it decodes a batch); on Linux each worker also asks the kernel for SIGKILL when its
parent dies (`PR_SET_PDEATHSIG`), so that `kill -9`, SIGTERM or SIGHUP of `cpia train` / `cpia eval`
leaves no worker behind.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

from ..lifetime import killed_with_parent

_capped_once: list[int] = []  # the cap is said once per process


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a job scheduler or `taskset` narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def capped_workers(requested: int) -> int:
    """`requested` DataLoader workers, at most one per available CPU; a lowered count is said once."""
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if not _capped_once:
        _capped_once.append(cpus)
        print(f"num_workers {requested} is more than the {cpus} CPUs available to this process; "
              f"using {cpus} DataLoader workers", file=sys.stderr)
    return cpus


def _die_with_parent(parent_pid: int, worker_id: int) -> None:
    """worker_init_fn: SIGKILL this worker when its parent dies (Linux); exit now if it already has."""
    killed_with_parent(parent_pid)


def worker_init() -> Callable[[int], None]:
    """A DataLoader `worker_init_fn` (picklable) that ties each worker's life to this process.

    The kernel signals a worker when the *thread* that started it ends, so iterate loaders with workers
    from a thread that lives as long as the run (the main thread here)."""
    return functools.partial(_die_with_parent, os.getpid())


def loader_workers(requested: int) -> dict:
    """DataLoader keyword arguments for `requested` workers: capped at the CPUs, tied to this process."""
    workers = capped_workers(requested)
    return {"num_workers": workers, "worker_init_fn": worker_init() if workers else None}
