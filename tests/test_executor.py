"""The local executor: a job that kills its worker costs only itself, whatever the number of workers."""
from __future__ import annotations

import os
import signal

import pytest

from cpia_hf.dataset.executor import LocalExecutor, WorkerKilled


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
    assert [r for k, r in enumerate(results) if k not in (3, 5, 8)] == [k * k for k in range(12) if k not in (3, 5, 8)]
    assert isinstance(results[3], WorkerKilled) and str(results[3]) == \
        "worker killed, signal 9 (SIGKILL), probably out of memory"
    assert isinstance(results[8], WorkerKilled) and str(results[8]) == "worker killed, signal 15 (SIGTERM)"
    assert isinstance(results[5], ValueError) and str(results[5]) == "bad input 5"
