"""Shared by the resume tests: start a `cpia convert` and kill it -9 once its first unit is done."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_first_unit(command: list[str], out: Path, timeout: float = 120) -> None:
    """Run `command` (a convert writing into `out`), SIGKILL it after the first unit record appears.

    Asserts that the kill landed mid-run: at least one unit was done and no dataset card was written yet.
    """
    units = out / ".work" / "units"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not list(units.rglob("*.json")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(units.rglob("*.json")), "no unit finished before the kill"
    assert not (out / "README.md").exists(), "the run finished before it was killed"
