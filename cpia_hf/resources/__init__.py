"""Data files the package reads: the release catalog and the two card templates.

They live, for readers, in the repository's top-level folders (`conversion/catalog.yaml`,
`loading_script/dataset_card.md.j2`, `model_cards/model_card.md.j2`); the entries here are links to
them, so that a checkout, an editable install and the wheel (which stores the linked files' content)
all read the same files through `importlib.resources`.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

CATALOG = "catalog.yaml"
DATASET_CARD_TEMPLATE = "dataset_card.md.j2"
MODEL_CARD_TEMPLATE = "model_card.md.j2"


def resource_path(name: str) -> Path:
    """Filesystem path of one of the package's data files."""
    path = Path(str(importlib.resources.files(__name__) / name))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: package data file missing (broken install or checkout)")
    return path


def read_resource(name: str) -> str:
    """Text of one of the package's data files."""
    return resource_path(name).read_text(encoding="utf-8")
