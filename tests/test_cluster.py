"""`cpia convert --scheduler`: conversion on a real Dask cluster on loopback (a `dask scheduler` process and
two `dask worker --nworkers 1 --nthreads 1` processes on 127.0.0.1, random free ports).

Faults are made inside the worker processes by tests/cluster_preload.py (`dask worker --preload`):
a unit whose file name contains "poison" kills its worker; every unit waits a moment first.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client
from interrupt import kill_after_first_unit
from loopback import loopback_cluster

from cpia_hf.dataset.cluster import ClusterError, resolve_scheduler, task_key
from cpia_hf.dataset.units import convert_unit

PRELOAD = Path(__file__).with_name("cluster_preload.py")
ROOT = Path(__file__).resolve().parents[1]
UNIT_DELAY_S = 0.5


def tree_digest(folder: Path) -> dict[str, str]:
    """Hashes of every published file (the `.work` cache aside)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".work" not in p.parts
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Scheduler address of a loopback cluster with two workers; a dead task is retried once."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    env = {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
        # one task per worker thread at a time: a dying worker takes only the task it runs with it
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
        "CPIA_TEST_UNIT_DELAY": str(UNIT_DELAY_S),
    }
    with loopback_cluster(2, env=env, worker_args=("--preload", str(PRELOAD)), log_dir=logs, timeout=90) as address:
        yield address


@pytest.fixture
def client(cluster: str):
    """A watching client; waits until both workers are up again (a killed one is restarted by its nanny)."""
    with Client(cluster, timeout=30, set_as_default=False) as watcher:
        watcher.wait_for_workers(2, timeout=60)
        yield watcher


def convert_command(sources: Path, out: Path, scheduler: str) -> list[str]:
    return [sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(sources / "catalog.yaml"),
            "--source-root", str(sources), "--out", str(out), "--scheduler", scheduler, "--no-progress"]


def run_convert(sources: Path, out: Path, scheduler: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(convert_command(sources, out, scheduler), capture_output=True, text=True, timeout=180,
                          **kwargs)


def test_cluster_output_is_byte_identical_to_a_local_run(demo_build: Path, cluster: str, client: Client,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    result = run_convert(demo_build / "sources", out, cluster)
    assert result.returncode == 0, result.stderr
    assert "units: 5 (0 already done)" in result.stdout
    assert tree_digest(out) == tree_digest(demo_build / "dataset")


def test_worker_killed_mid_run_loses_nothing(demo_build: Path, cluster: str, client: Client, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    process = subprocess.Popen(convert_command(demo_build / "sources", out, cluster), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 60
    while victim is None and time.time() < deadline and process.poll() is None:
        busy = {w: keys for w, keys in client.processing().items() if any(k.startswith("cpia-convert") for k in keys)}
        if busy:
            victim = next(iter(busy))
            held = busy[victim]
        time.sleep(0.05)
    assert victim is not None, "no unit was running"
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert held and "units: 5 (" in stdout
    assert tree_digest(out) == tree_digest(demo_build / "dataset")


def test_poisoned_unit_is_named_and_the_rest_finishes(demo_build: Path, cluster: str, client: Client,
                                                      tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    shutil.copytree(demo_build / "sources", sources)
    shutil.copy(sources / "demo-breast-wsi" / "BRCA-0002.tiff", sources / "demo-breast-wsi" / "poison-0001.tiff")
    out = tmp_path / "dataset"
    result = run_convert(sources, out, cluster)
    assert result.returncode == 1
    # the line the local pool gives a killed worker: the reason as words, never an exception's repr
    assert re.search(r"^  \[demo-breast-wsi\] demo-breast-wsi/poison-0001\.tiff: worker killed 2 times running it "
                     r"\(distributed\.scheduler\.allowed-failures = 1\): probably out of memory or a crashing "
                     r"decoder; last worker tcp://127\.0\.0\.1:\d+$", result.stderr, re.M), result.stderr
    assert "FAILED: 1 file(s)" in result.stderr  # only the poisoned unit
    built = {k: v for k, v in tree_digest(out).items() if k.startswith("data/")}
    assert built == {k: v for k, v in tree_digest(demo_build / "dataset").items() if k.startswith("data/")}


def test_a_file_that_kills_its_workers_costs_only_itself_in_an_roi_batch(demo_build: Path, cluster: str,
                                                                          client: Client, tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    shutil.copytree(demo_build / "sources", sources)
    shutil.copy(sources / "demo-blood-roi" / "cell_02.jpg", sources / "demo-blood-roi" / "cell_02_poison.jpg")
    out = tmp_path / "dataset"
    result = run_convert(sources, out, cluster)
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("  [")]
    assert len(failed) == 1 and re.fullmatch(
        r"  \[demo-blood-roi\] demo-blood-roi/cell_02_poison\.jpg: worker killed 2 times running it "
        r"\(distributed\.scheduler\.allowed-failures = 1\): probably out of memory or a crashing decoder; "
        r"last worker tcp://127\.0\.0\.1:\d+", failed[0]), result.stderr
    built = {k: v for k, v in tree_digest(out).items() if k.startswith("data/")}
    assert built == {k: v for k, v in tree_digest(demo_build / "dataset").items() if k.startswith("data/")}


def test_interrupted_client_resumes(demo_build: Path, cluster: str, client: Client, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    kill_after_first_unit(convert_command(demo_build / "sources", out, cluster), out)
    result = run_convert(demo_build / "sources", out, cluster)
    assert result.returncode == 0, result.stderr
    done = int(re.search(r"units: 5 \((\d+) already done\)", result.stdout).group(1))
    assert done >= 1
    assert tree_digest(out) == tree_digest(demo_build / "dataset")


def test_task_keys_are_pure_and_stable(demo_build: Path) -> None:
    from cpia_hf.dataset.catalog import load_catalog
    from cpia_hf.dataset.units import ConvertOptions, discover_units

    entry = load_catalog(demo_build / "sources" / "catalog.yaml")[0]
    unit = discover_units(entry, demo_build / "sources")[0]
    args = (unit, demo_build / "sources", demo_build / "dataset" / ".work", ConvertOptions())
    code = ("import sys; from pathlib import Path; from cpia_hf.dataset.catalog import load_catalog; "
            "from cpia_hf.dataset.units import ConvertOptions, convert_unit, discover_units; "
            "from cpia_hf.dataset.cluster import task_key; s = Path(sys.argv[1]); "
            "u = discover_units(load_catalog(s / 'catalog.yaml')[0], s)[0]; "
            "print(task_key(convert_unit, (u, s, Path(sys.argv[2]), ConvertOptions()), 'convert units'))")
    other = subprocess.run([sys.executable, "-c", code, str(args[1]), str(args[2])], capture_output=True, text=True)
    assert other.stdout.strip() == task_key(convert_unit, args, "convert units")
    changed = (unit, args[1], args[2], ConvertOptions(jpeg_quality=80))
    assert task_key(convert_unit, changed, "convert units") != task_key(convert_unit, args, "convert units")


def test_scheduler_auto_and_unreachable(monkeypatch: pytest.MonkeyPatch, demo_build: Path, tmp_path: Path) -> None:
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="DASK_SCHEDULER_ADDRESS"):
        resolve_scheduler("auto")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:1")
    assert resolve_scheduler("auto") == "tcp://127.0.0.1:1"
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    result = run_convert(demo_build / "sources", tmp_path / "o", "auto", env=env)
    assert result.returncode == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in result.stderr
