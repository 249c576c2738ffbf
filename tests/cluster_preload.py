"""`dask worker --preload` module of tests/test_cluster.py: test-only faults inside the worker processes.

A worker process imports this before it runs tasks; it wraps `convert_unit` (tasks name it by module
and qualified name, so they pick up the wrapper): a unit whose file name contains "poison" kills its
worker process with SIGKILL, as an out-of-memory kill would, and every unit waits
CPIA_TEST_UNIT_DELAY seconds first, so that a test can kill a worker while it holds a unit.
"""
from __future__ import annotations

import os
import signal
import time

from cpia_hf.dataset import units

# Dask may import a preload file more than once in a process: wrap the original function only once.
_convert_unit = getattr(units.convert_unit, "__wrapped__", units.convert_unit)


def convert_unit(unit, *args, **kwargs):
    if any("poison" in file for file in unit.files):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("CPIA_TEST_UNIT_DELAY", "0")))
    return _convert_unit(unit, *args, **kwargs)


convert_unit.__wrapped__ = _convert_unit
units.convert_unit = convert_unit
