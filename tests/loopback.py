"""A Dask cluster on loopback for the tests and the benchmarks: `dask scheduler` and `dask worker` processes.

Tests import it as `loopback`; `benchmarks/convert_cluster.py` imports it by path. A real cluster is
started by Dask's own launchers (docs/cluster.md).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def loopback_cluster(workers: int, *, threads: int = 1, env: dict[str, str] | None = None,
                     worker_args: tuple[str, ...] = (), log_dir: Path | None = None,
                     timeout: float = 60) -> Iterator[str]:
    """A `dask scheduler` and `workers` x `dask worker --nworkers 1` processes on 127.0.0.1 (random free
    ports); yields the scheduler address and stops every process on exit (SIGTERM, then SIGKILL)."""
    from distributed import Client

    dask_cli = [str(Path(sys.executable).with_name("dask"))]
    if not Path(dask_cli[0]).exists():
        dask_cli = [sys.executable, "-m", "dask"]
    env = {**os.environ, **(env or {})}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> None:
        log = open(log_dir / f"{name}.log", "wb") if log_dir else subprocess.DEVNULL
        processes.append(subprocess.Popen(dask_cli + args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    try:
        start(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"], "scheduler")
        for k in range(workers):
            start(["worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", str(threads),
                   "--dashboard-address", ":0", "--name", f"w{k}", *worker_args], f"worker{k}")
        with Client(address, timeout=timeout, set_as_default=False) as client:
            client.wait_for_workers(workers, timeout=timeout)
        yield address
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
        deadline = time.monotonic() + 10
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                process.wait()
