"""The shipped source catalog matches the release's reference tables; bad catalogs are rejected clearly."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from cpia_hf.dataset.catalog import (
    ORGANS,
    CatalogEntry,
    CatalogError,
    default_catalog_path,
    load_catalog,
    subset_slug,
)

REFERENCE = Path(__file__).parents[1].parent / "shared/reference"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference tables not found at {REFERENCE}")


@pytest.fixture(scope="module")
def entries() -> list[CatalogEntry]:
    return load_catalog(default_catalog_path())


@pytest.fixture(scope="module")
def released() -> dict[tuple[str, str, str | None], dict[str, int]]:
    """(kind, subset, ROI scale or None) -> {scale: images}, from the reference table."""
    counts: dict[tuple[str, str, str | None], dict[str, int]] = defaultdict(dict)
    with open(REFERENCE / "cpia_subsets_by_scale.csv", newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            kind = row["kind"].lower()
            key = (kind, row["subset"], row["scale"] if kind == "roi" else None)
            counts[key][row["scale"]] = int(row["images"])
    return dict(counts)


@needs_reference
def test_one_entry_per_released_subset(entries, released):
    keys = [(entry.kind, entry.name, entry.scale) for entry in entries]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(released)


@needs_reference
def test_expected_counts_match_release(entries, released):
    for entry in entries:
        assert entry.expected_images == released[(entry.kind, entry.name, entry.scale)], entry.name
    total = sum(sum(entry.expected_images.values()) for entry in entries)
    assert total == sum(sum(counts.values()) for counts in released.values()) == 148_962_586


@needs_reference
def test_organ_vocabulary_is_table_one():
    with open(REFERENCE / "paper_table1_organs.csv", newline="", encoding="utf-8") as file:
        organs = [row["organ"].lower() for row in csv.DictReader(file) if row["organ"] != "Total number"]
    assert ORGANS == tuple("brain" if organ == "brian" else organ for organ in organs)


@needs_reference
def test_label_hint_and_suffix_follow_roi_table(entries):
    with open(REFERENCE / "cpia_roi_sources.csv", newline="", encoding="utf-8") as file:
        sources = {row["subset"]: row for row in csv.DictReader(file)}
    for entry in entries:
        if entry.kind != "roi":
            continue
        # A source released at several scales is the prefix of each released name (BreakHis -> BreaKHis_40x).
        source = sources[max((name for name in sources if entry.name.lower().startswith(name.lower())), key=len)]
        suffix = entry.pattern.rsplit(".", 1)[1]
        assert suffix == source["source_suffix"] or (suffix == "jpeg" and source["source_suffix"] == "jpg"), entry.name
        if source["class_in_filename"] == "TRUE" and entry.label_from is None:
            # The class is in the source's own file names (BreakHis, WSSS4LUAD), not in a folder.
            assert entry.name.startswith(("BreaKHis", "WSSS4LUAD")), entry.name


def test_entries_are_complete(entries):
    assert sum(entry.kind == "wsi" for entry in entries) == 55
    for entry in entries:
        assert entry.organ in ORGANS, entry.name
        assert (entry.scale is None) == (entry.kind == "wsi"), entry.name
        expected_scales = {"XL", "L", "M", "S"} if entry.kind == "wsi" else {entry.scale}
        assert set(entry.expected_images) == set(entry.released_names) == expected_scales, entry.name


def test_slugs_unique_and_folder_safe(entries):
    slugs = [subset_slug(entry.name) for entry in entries]
    assert len({slug.lower() for slug in slugs}) == len(entries)
    for slug in slugs:
        assert slug and set(slug) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
    assert subset_slug("Naylor et al, IEEE TMI 2019") == "Naylor_et_al_IEEE_TMI_2019"
    assert subset_slug("Monuseg_train&test") == "Monuseg_train_test"


def test_to_dict_round_trips(entries, tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "source_root_note": "x", "entries": [e.to_dict() for e in entries]}))
    assert load_catalog(path) == entries


GOOD_WSI = {"name": "TCGA-XX", "kind": "wsi", "path": "TCGA-XX", "pattern": "**/*.svs", "organ": "lung",
            "disease": "d", "stain": "H&E", "field": "histopathology", "license": "unknown",
            "homepage": "unknown", "citation": "c", "mpp": 0.25, "expected_images": {"XL": 1, "L": 16}}
GOOD_ROI = {**{k: v for k, v in GOOD_WSI.items() if k not in ("mpp", "expected_images")},
            "name": "Some ROIs", "kind": "roi", "pattern": "*/*.png", "scale": "M", "label_from": "parent",
            "expected_images": {"M": 3}}


def write_catalog(tmp_path: Path, *entries: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "source_root_note": "x", "entries": list(entries)}))
    return path


def test_valid_minimal_catalog(tmp_path):
    wsi, roi = load_catalog(write_catalog(tmp_path, GOOD_WSI, GOOD_ROI))
    assert wsi.mpp == 0.25 and wsi.scale is None and wsi.expected_images == {"XL": 1, "L": 16}
    assert roi.scale == "M" and roi.label_from == "parent" and roi.mpp is None


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({**GOOD_ROI, "colour": "pink"}, "unknown key"),
        ({k: v for k, v in GOOD_ROI.items() if k != "license"}, "missing field"),
        ({**GOOD_ROI, "kind": "tile"}, "kind 'tile'"),
        ({**GOOD_ROI, "organ": "Brian"}, "organ 'Brian'"),
        ({**GOOD_WSI, "scale": "L"}, "not allowed for a wsi entry"),
        ({**GOOD_ROI, "mpp": 0.5}, "not allowed for a roi entry"),
        ({**GOOD_ROI, "scale": "XL"}, "needs scale"),
        ({**GOOD_WSI, "mpp": -1}, "mpp must be"),
        ({**GOOD_WSI, "mpp": "0.25"}, "mpp must be"),
        ({**GOOD_ROI, "expected_images": {"L": 3}}, "expected_images has scale 'L'"),
        ({**GOOD_WSI, "expected_images": {"XL": 2.5}}, "must be a non-negative integer"),
        ({**GOOD_ROI, "label_from": "filename"}, "label_from 'filename'"),
        ({**GOOD_ROI, "pattern": "../*.png"}, "inside the source root"),
        ({**GOOD_ROI, "homepage": "www.example.org"}, "neither a URL"),
        ({**GOOD_ROI, "disease": ""}, "non-empty string"),
    ],
)
def test_bad_entry_names_file_entry_and_problem(tmp_path, bad, problem):
    path = write_catalog(tmp_path, GOOD_WSI, bad)
    with pytest.raises(CatalogError) as raised:
        load_catalog(path)
    message = str(raised.value)
    assert str(path) in message and f"entry 1 ({bad.get('name')!r})" in message and problem in message


def test_duplicate_and_clashing_names(tmp_path):
    with pytest.raises(CatalogError, match=r"entry 1 \('TCGA-XX'\): duplicate name"):
        load_catalog(write_catalog(tmp_path, GOOD_WSI, GOOD_WSI))
    clash = {**GOOD_ROI, "name": "Some&ROIs"}  # same folder as "Some ROIs"
    with pytest.raises(CatalogError, match=r"entry 2 \('Some&ROIs'\): folder name clashes with 'Some ROIs'"):
        load_catalog(write_catalog(tmp_path, GOOD_WSI, GOOD_ROI, clash))


def test_bad_document(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nentries: [\n")
    with pytest.raises(CatalogError, match="broken.yaml: cannot read catalog"):
        load_catalog(path)
    path.write_text(yaml.safe_dump({"version": 2, "source_root_note": "x", "entries": [GOOD_WSI]}))
    with pytest.raises(CatalogError, match="broken.yaml: unsupported version 2"):
        load_catalog(path)
