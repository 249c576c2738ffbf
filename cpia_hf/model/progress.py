"""The progress bars of the libraries a run calls (transformers' "Loading weights" and "Writing model
shards", huggingface_hub's downloads and uploads, datasets' loading) switched with a run's own
`--no-progress`."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def library_progress(enabled: bool) -> Iterator[None]:
    """Within the block, the libraries' bars are on or off as `enabled` says; restored afterwards."""
    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    if enabled:
        yield
        return
    before = (transformers_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(),
              datasets.is_progress_bar_enabled())
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if before[0]:
            transformers_logging.enable_progress_bar()
        if not before[1]:
            hub_utils.enable_progress_bars()
        if before[2]:
            datasets.enable_progress_bars()
