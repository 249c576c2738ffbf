"""Shared fixtures: one demo conversion per test session (generated sources, all configs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpia_hf.demo.demo import build_demo

# A real H&E slide region (Aperio SVS, 0.499 µm/px), OpenSlide's freely distributable test data.
REAL_SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<root>/sources` (generated sources + catalog.yaml) and `<root>/dataset` (converted folder)."""
    root = tmp_path_factory.mktemp("demo")
    report = build_demo(root, workers=2, progress=False)
    assert report.ok, report.failures
    return root


@pytest.fixture(scope="session")
def real_slide() -> Path:
    """The real Aperio slide region (see tests/data/README.md)."""
    return REAL_SLIDE


# --- no process outlives the suite -------------------------------------------------------------------------
# The session becomes a "child subreaper" (Linux): a process orphaned by any test (a worker whose `cpia
# convert` was killed) is re-parented to the session instead of init, so the check at the end sees it.
PR_SET_CHILD_SUBREAPER = 36
LEFTOVER_GRACE_S = 10.0


def pytest_sessionstart(session: pytest.Session) -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the check still sees the session's own children
        pass


def leftover_processes(grace_s: float = LEFTOVER_GRACE_S) -> list:
    """Descendants of this process still alive after `grace_s` (zombies reaped and not counted)."""
    import time

    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    child.wait(0)  # an orphan re-parented to the session: reap it
                else:
                    alive.append(child)
            except (psutil.Error, ChildProcessError):
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import psutil

    if hasattr(session.config, "workerinput"):  # an xdist worker: its controller checks
        return
    alive = leftover_processes()
    if not alive:
        return
    lines = []
    for process in alive:
        try:
            lines.append(f"  pid {process.pid}: {' '.join(process.cmdline())[:200]}")
            process.kill()
        except psutil.Error:
            pass
    print(f"\nFAILED: {len(alive)} process(es) started by the tests outlived them (killed now):\n" + "\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
