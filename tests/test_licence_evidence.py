"""Licences with their evidence: the catalog carries the second evidence pass, `cpia push` gates on it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from fakehub import fake_hub  # noqa: F401  (pytest fixture)
from test_push import built_folder, push_args

from cpia_hf.dataset.card import split_card
from cpia_hf.dataset.catalog import LICENCE_STATUSES, CatalogError, default_catalog_path, load_catalog
from cpia_hf.dataset.cli import run_push
from cpia_hf.dataset.licences import CARD_KEY, LicenceRefused, clear_for_push

EVIDENCE = Path(__file__).parents[1].parent / "shared/reference/licence_evidence.md"
# the evidence file's last column -> the catalog's status
HAND_TO_STATUS = {"first-hand": "owner", "second-hand": "second-hand", "not found": "unknown"}
CONFLICTS = {"BreaKHis_40x", "BreaKHis_100x", "BreaKHis_200x", "BreaKHis_400x", "CoNSeP",
             "Lung_and_Colon_Cancer_Histopathological_Images_Colon", "Lung_and_Colon_Cancer_Histopathological_Images_Lung"}


@pytest.fixture(scope="module")
def release():
    return {entry.name: entry for entry in load_catalog(default_catalog_path())}


def evidence_rows() -> dict[str, dict[str, str]]:
    """catalog name -> {licence, hand} from the evidence table (independent of the catalog)."""
    rows = {}
    for line in EVIDENCE.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("catalog name", "---"):
            rows[cells[0]] = {"licence": cells[1], "hand": cells[5]}
    return rows


def test_every_entry_has_a_status_and_every_licence_its_source(release):
    for entry in release.values():
        assert entry.license_status in LICENCE_STATUSES, entry.name
        assert (entry.license_status == "unknown") == (entry.license == "unknown"), entry.name
        if entry.license_status != "unknown":
            assert re.match(r"https?://\S+$", entry.license_source), entry.name
        if entry.license_status in ("second-hand", "conflict"):
            assert entry.license_evidence and '"' in entry.license_evidence, entry.name  # a quoted phrase
    counts = {s: sum(e.license_status == s for e in release.values()) for s in LICENCE_STATUSES}
    assert counts == {"owner": 71, "second-hand": 15, "conflict": 7, "unknown": 15}


@pytest.mark.skipif(not EVIDENCE.is_file(), reason=f"evidence file not found at {EVIDENCE}")
def test_catalog_carries_the_evidence_file(release):
    rows = evidence_rows()
    assert len(rows) == 41 and set(rows) <= set(release)
    for name, row in rows.items():
        entry = release[name]
        hand = row["hand"].split(" (")[0]
        expected = "conflict" if name in CONFLICTS else HAND_TO_STATUS[hand]
        assert entry.license_status == expected, name
        named = re.match(r"(CC-BY[-A-Z0-9.]*)$", row["licence"])
        if named:  # a named licence is carried as the file names it, never another one
            assert entry.license == named.group(1), name
        if expected == "unknown":
            assert entry.license == "unknown", name
    for name in CONFLICTS:
        assert release[name].license.startswith("conflicting: "), name
    tcia = [e for e in release.values() if e.access == "tcia"]
    assert all(e.homepage.startswith("https://www.cancerimagingarchive.net/collection/") for e in tcia)


def entry(name: str, **fields) -> dict:
    base = {"name": name, "kind": "roi", "scale": "M", "path": name, "pattern": "*.png", "organ": "breast",
            "disease": "d", "stain": "H&E", "field": "histopathology", "license": "CC-BY-4.0",
            "homepage": "https://example.org", "citation": "c"}
    return {**base, **fields}


def write(tmp_path: Path, *entries: dict) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "entries": list(entries)}))
    return path


@pytest.mark.parametrize("fields, problem", [
    ({"license_status": "first-hand", "license_source": "https://x.org"}, "license_status 'first-hand'"),
    ({"license_status": "owner"}, "needs license_source"),
    ({"license_status": "second-hand", "license_source": "https://x.org"}, "needs license_evidence"),
    ({"license_status": "conflict", "license_source": "https://x.org"}, "needs license_evidence"),
    ({"license_status": "owner", "license_source": "x.org/terms"}, "is not a URL"),
    ({"license_status": "unknown"}, "exactly when its status is"),
    ({"license": "unknown", "license_status": "owner", "license_source": "https://x.org"}, "exactly when"),
])
def test_inconsistent_evidence_is_refused(tmp_path, fields, problem):
    with pytest.raises(CatalogError, match=re.escape(problem)):
        load_catalog(write(tmp_path, entry("a", **fields)))


def test_duplicate_keys_are_refused_with_key_and_line(tmp_path):
    path = tmp_path / "catalog.yaml"
    text = write(tmp_path, entry("a"), entry("b")).read_text()
    lines = text.splitlines()
    second = next(i for i, line in enumerate(lines) if line.strip() == "license: CC-BY-4.0")
    lines.insert(second + 1, lines[second].replace("CC-BY-4.0", "unknown"))  # the same key again, next line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CatalogError) as raised:
        load_catalog(path)
    assert str(raised.value) == (f"{path}: line {second + 2}: duplicate key 'license' (first given at line "
                                 f"{second + 1})")
    path.write_text("version: 1\nentries: []\nversion: 1\n")  # at the top level too
    with pytest.raises(CatalogError, match=r"line 3: duplicate key 'version' \(first given at line 1\)"):
        load_catalog(path)


EVIDENCED = {
    "own-a": {"license": "CC-BY-4.0", "license_status": "owner", "license_source": "https://a.org/licence"},
    "second-b": {"license": "CC-BY-4.0", "license_status": "second-hand", "license_source": "https://mirror.org/b",
                 "license_evidence": 'a mirror: "CC BY 4.0"'},
    "conflict-c": {"license": "conflicting: CC-BY-4.0 vs non-commercial", "license_status": "conflict",
                   "license_source": "https://mirror.org/c", "license_evidence": 'one: "CC BY"; another: "NC"'},
    "unknown-d": {"license": "unknown"},
}


@pytest.fixture
def evidenced(tmp_path):
    catalog = write(tmp_path, *(entry(name, **fields) for name, fields in EVIDENCED.items()))
    folder = built_folder(tmp_path / "cpia", {name: fields["license"] for name, fields in EVIDENCED.items()})
    return folder, catalog


def test_push_refuses_unknown_and_conflict_and_asks_for_second_hand(fake_hub, evidenced, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    folder, catalog = evidenced
    assert run_push(push_args(folder, fake_hub, catalog=catalog)) == 2
    err = capsys.readouterr().err
    assert "conflict-c: conflicting: CC-BY-4.0 vs non-commercial (sources disagree" in err
    assert "unknown-d: unknown (no licence established)" in err
    assert "second-b: CC-BY-4.0 per https://mirror.org/b" in err and "--accept-second-hand" in err
    assert "own-a" not in err and fake_hub.requests == []

    # the refused ones named: the second-hand one still needs its own acknowledgement
    assert run_push(push_args(folder, fake_hub, catalog=catalog, include_restricted="conflict-c,unknown-d")) == 2
    err = capsys.readouterr().err
    assert "second-b" in err and "conflict-c" not in err and fake_hub.requests == []
    # only a second-hand subset can be accepted as one
    with pytest.raises(ValueError, match=r"not second-hand: own-a \(owner\)"):
        run_push(push_args(folder, fake_hub, catalog=catalog, include_restricted="conflict-c,unknown-d",
                           accept_second_hand="own-a,second-b"))

    assert run_push(push_args(folder, fake_hub, catalog=catalog, include_restricted="conflict-c,unknown-d",
                              accept_second_hand="second-b")) == 0
    received = fake_hub.received_files("dataset", "someone/cpia")
    metadata, _ = split_card(received["README.md"].decode())
    assert metadata[CARD_KEY] == {"included_restricted": ["conflict-c", "unknown-d"], "accepted_second_hand": ["second-b"]}
    licences = received["LICENSES.md"].decode()
    assert "| second-b | CC-BY-4.0 | second-hand, https://mirror.org/b (accepted second-hand by the publisher) |" in licences
    assert "| own-a | CC-BY-4.0 | owner, https://a.org/licence |" in licences
    assert "(`--accept-second-hand`): second-b." in licences


def test_rows_built_under_another_licence_are_refused(tmp_path, evidenced):
    folder, catalog = evidenced
    entries = load_catalog(catalog)
    with pytest.raises(LicenceRefused, match=r"own-a: unknown \(the catalog now says 'CC-BY-4.0' \(owner\): rebuild"):
        clear_for_push(folder, {"own-a": "unknown"}, entries, "", "")
    clearance = clear_for_push(folder, {"own-a": "CC-BY-4.0", "elsewhere": "CC0-1.0"}, entries, "", "")
    assert clearance.statuses == {"elsewhere": None, "own-a": "owner"}  # not in the catalog: no evidence recorded
    assert clearance.card_metadata() == {}
