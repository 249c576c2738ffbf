"""The local executor: a job that kills its worker costs only itself, whatever the number of workers."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cpia_hf.dataset.cluster import DaskExecutor
from cpia_hf.dataset.errors import WorkerKilled
from cpia_hf.dataset.executor import Executor, LocalExecutor

STARTED_BY = "CPIA_TEST_WORKER_STARTED_BY"


def job(k: int) -> int:
    if k in (3, 8):
        os.kill(os.getpid(), signal.SIGKILL if k == 3 else signal.SIGTERM)
    if k == 5:
        raise ValueError("bad input 5")
    return k * k


@pytest.mark.parametrize("workers", [1, 3])
def test_killers_are_named_and_the_rest_completes(workers: int) -> None:
    with LocalExecutor(workers) as executor:
        results = executor.map(job, [(k,) for k in range(12)], "jobs", progress=False)
    assert [r.value for k, r in enumerate(results) if k not in (3, 5, 8)] == \
        [k * k for k in range(12) if k not in (3, 5, 8)]
    assert all(r.ok for k, r in enumerate(results) if k not in (3, 5, 8))
    assert isinstance(results[3].error, WorkerKilled)
    assert results[3].reason() == "worker killed, signal 9 (SIGKILL), probably out of memory"
    assert isinstance(results[8].error, WorkerKilled) and results[8].reason() == "worker killed, signal 15 (SIGTERM)"
    assert isinstance(results[5].error, ValueError) and results[5].reason() == "ValueError: bad input 5"


def mark_worker() -> None:
    os.environ[STARTED_BY] = f"initializer in {os.getpid()}"


def started_by(k: int, died: Path) -> str | None:
    if k == 1 and not died.exists():  # dies in the pool; its retry alone runs to the end
        died.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.environ.get(STARTED_BY)


def test_the_initializer_runs_in_every_worker_process(tmp_path: Path) -> None:
    died = tmp_path / "died"
    with LocalExecutor(2, initializer=mark_worker) as executor:
        results = executor.map(started_by, [(k, died) for k in range(4)], "jobs", progress=False)
    assert died.exists()
    assert [r.ok for r in results] == [True] * 4
    assert all(r.value is not None and r.value.startswith("initializer in ") for r in results)
    assert os.environ.get(STARTED_BY) is None  # not in this process


def test_both_executors_satisfy_the_protocol() -> None:
    assert isinstance(LocalExecutor(1), Executor) and isinstance(DaskExecutor("tcp://127.0.0.1:1"), Executor)


def worker_pid(k: int) -> int:
    if k == 99:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_one_pool_serves_every_map_of_a_with_block_and_ends_with_it() -> None:
    with LocalExecutor(1) as executor:
        first = {r.value for r in executor.map(worker_pid, [(k,) for k in range(3)], "stage 1", progress=False)}
        second = {r.value for r in executor.map(worker_pid, [(k,) for k in range(3)], "stage 2", progress=False)}
        assert len(first) == 1 and second == first  # the workers started once, not once per stage
        killed = executor.map(worker_pid, [(0,), (99,)], "stage 3", progress=False)
        assert isinstance(killed[1].error, WorkerKilled) and killed[0].ok
        after = {r.value for r in executor.map(worker_pid, [(k,) for k in range(3)], "stage 4", progress=False)}
        assert len(after) == 1 and after != first  # a new pool once a worker died
        assert all(alive(pid) for pid in after)
    assert not any(alive(pid) for pid in first | after)


def test_a_map_outside_a_with_block_leaves_no_worker() -> None:
    executor = LocalExecutor(2)
    pids = {r.value for r in executor.map(worker_pid, [(k,) for k in range(4)], "jobs", progress=False)}
    assert pids and not any(alive(pid) for pid in pids)
