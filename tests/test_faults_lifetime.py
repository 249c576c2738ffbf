"""Workers die with their run: `kill -9`, SIGTERM, SIGHUP or Ctrl-C of `cpia convert` leaves no process of
the run alive and nothing written after it, and the rerun equals a clean run (cpia_hf/lifetime.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from filelock import FileLock

from cpia_hf.atomic import OutputError, write_atomic
from cpia_hf.lifetime import RunGuard, guarded_by

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = Path(__file__).with_name("cluster_preload.py")
AFTER_KILL_S = 5.0


def tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".work" not in p.parts}


def convert_command(sources: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(sources / "catalog.yaml"),
            "--source-root", str(sources), "--out", str(out), "--no-progress", *extra]


def signal_mid_run(command: list[str], out: Path, signum: int, timeout: float = 120):
    """Start `command`, send `signum` once its first unit is done; (process, its descendants at that moment,
    the time of the signal). Asserts that the signal landed mid-run."""
    units = out / ".work" / "units"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not list(units.rglob("*.json")):
        time.sleep(0.05)
    descendants = psutil.Process(process.pid).children(recursive=True)
    sent = time.time()
    os.kill(process.pid, signum)
    process.wait(timeout=60)
    assert list(units.rglob("*.json")), "no unit finished before the signal"
    assert not (out / "README.md").exists(), "the run finished before the signal"
    return process, descendants, sent


def alive(processes: list[psutil.Process]) -> list[int]:
    found = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except psutil.Error:
            pass
    return found


def written_since(out: Path, since: float) -> list[str]:
    """Files of `out` renamed into place (or changed) after `since` (the lock's own files aside)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and p.stat().st_mtime > since and "convert.lock" not in p.name)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP], ids=["KILL", "TERM", "HUP"])
def test_signal_leaves_no_worker_and_the_rerun_equals_a_clean_run(demo_build: Path, tmp_path: Path,
                                                                   signum: int) -> None:
    out = tmp_path / "dataset"
    command = convert_command(demo_build / "sources", out, "--workers", "2")
    process, workers, sent = signal_mid_run(command, out, signum)
    assert workers, "the run had no worker process when it was signalled"
    time.sleep(AFTER_KILL_S)
    assert alive(workers) == [], f"workers outlived their run ({signal.Signals(signum).name})"
    assert written_since(out, sent + 1.0) == []  # nothing renamed into place once the workers are gone
    if signum != signal.SIGKILL:
        lines = process.stderr.read().splitlines()
        assert lines == [f"cpia convert: stopped by {signal.Signals(signum).name}; rerun the same command to resume"]
        assert process.returncode == 128 + signum
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert tree_digest(out) == tree_digest(demo_build / "dataset")


def test_ctrl_c_is_one_line_and_status_130(demo_build: Path, tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C: one line, exit 130, no worker left."""
    out = tmp_path / "dataset"
    command = convert_command(demo_build / "sources", out, "--workers", "2")
    units = out / ".work" / "units"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    while not list(units.rglob("*.json")) and process.poll() is None:
        time.sleep(0.05)
    workers = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert stderr.splitlines() == ["cpia convert: interrupted; rerun the same command to resume"]
    assert process.returncode == 130
    time.sleep(1)
    assert alive(workers) == []
    assert not list(out.rglob("*.tmp[0-9]*"))  # the run's temporary files removed as it stopped


def held_lock(tmp_path: Path, owner: str) -> tuple[FileLock, RunGuard]:
    lock_path = tmp_path / "convert.lock"
    lock = FileLock(lock_path, timeout=0)
    lock.acquire()
    (tmp_path / "convert.lock.owner").write_text(owner)
    return lock, RunGuard(str(lock_path), owner)


def test_a_task_writes_only_while_its_run_holds_the_output(tmp_path: Path) -> None:
    """The check a Dask task makes before it renames a file: the lock held, by the run that submitted it."""
    owner = json.dumps({"pid": 1, "host": "h", "since": "s"})
    lock, guard = held_lock(tmp_path, owner)
    with guarded_by(guard):
        write_atomic(tmp_path / "a.bin", b"a")  # the run holds the lock: written
        (tmp_path / "convert.lock.owner").write_text(owner.replace("1", "2"))
        with pytest.raises(OutputError, match="held by another run; nothing written"):
            write_atomic(tmp_path / "b.bin", b"b")
        lock.release()
        with pytest.raises(OutputError, match="has ended; nothing written"):
            write_atomic(tmp_path / "c.bin", b"c")
    write_atomic(tmp_path / "d.bin", b"d")  # no guard outside a task
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["a.bin", "d.bin"]
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A loopback cluster whose units each wait 2 s first, so that tasks are in flight when the client dies."""
    from loopback import loopback_cluster  # the tests' launcher (tests/ is on the path)

    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CPIA_TEST_UNIT_DELAY": "2"}
    with loopback_cluster(2, env=env, worker_args=("--preload", str(PRELOAD)),
                          log_dir=tmp_path_factory.mktemp("cluster-logs"), timeout=90) as address:
        yield address


def test_killed_client_leaves_nothing_written_by_its_tasks(demo_build: Path, slow_cluster: str,
                                                            tmp_path: Path) -> None:
    """`kill -9` of a `--scheduler` run: its client has no process left, the tasks it had in flight rename
    nothing afterwards (they check the output lock first), and the rerun equals a clean local run."""
    out = tmp_path / "dataset"
    command = convert_command(demo_build / "sources", out, "--scheduler", slow_cluster)
    _, descendants, sent = signal_mid_run(command, out, signal.SIGKILL, timeout=180)
    time.sleep(AFTER_KILL_S)
    assert alive(descendants) == []
    assert written_since(out, sent + 0.5) == []
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert tree_digest(out) == tree_digest(demo_build / "dataset")
