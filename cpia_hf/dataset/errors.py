"""The errors a conversion run reports instead of raising, one class each whichever executor ran the job."""
from __future__ import annotations


class WorkerKilled(Exception):
    """A job whose worker process died each time it ran (out of memory, a crashing decoder); str() says how,
    in words that go into the summary as they are."""


class ClusterError(Exception):
    """The cluster cannot be used (unreachable scheduler, workers with another cpia-hf version)."""
