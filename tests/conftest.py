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
