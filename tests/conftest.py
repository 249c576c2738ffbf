"""Shared fixtures: one demo conversion per test session (generated sources, all configs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpia_hf.demo.demo import build_demo


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<root>/sources` (generated sources + catalog.yaml) and `<root>/dataset` (converted folder)."""
    root = tmp_path_factory.mktemp("demo")
    report = build_demo(root, workers=2, progress=False)
    assert report.ok, report.failures
    return root
