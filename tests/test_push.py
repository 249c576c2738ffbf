"""`cpia push`: private by default, restricted licences refused unless named, card rendered for the repo id."""
from __future__ import annotations

import argparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fakehub import fake_hub  # noqa: F401  (pytest fixture)

from cpia_hf.dataset.card import REPO_PLACEHOLDER, split_card
from cpia_hf.dataset.cli import run_push

SUBSETS = {"open-a": "CC-BY-4.0", "nc-b": "CC-BY-NC-SA-4.0", "paip-c": "PAIP data use agreement", "unk-d": "unknown"}


def built_folder(root, subsets: dict[str, str]):
    card = (f"---\nlicense: other\npretty_name: CPIA\nconfigs:\n- config_name: full\n  data_files:\n  - split: train\n"
            f"    path: data/full/*/*/*.parquet\n---\n# CPIA\n\n```python\nload_dataset(\"{REPO_PLACEHOLDER}\")\n```\n")
    (root / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(card)
    for subset, licence in subsets.items():
        shard = root / "data" / "full" / "M" / subset / f"{subset}-00000.parquet"
        shard.parent.mkdir(parents=True)
        pq.write_table(pa.table({"subset": [subset] * 3, "license": [licence] * 3, "x": [1, 2, 3]}), shard)
    return root


def push_args(folder, hub, **overrides):
    values = dict(repo=folder, repo_id="someone/cpia", public=False, include_restricted="", catalog=None,
                  endpoint=hub.url)
    return argparse.Namespace(**{**values, **overrides})


def test_restricted_licences_are_refused_before_anything_is_sent(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    folder = built_folder(tmp_path / "cpia", SUBSETS)
    assert run_push(push_args(folder, fake_hub)) == 2
    err = capsys.readouterr().err
    assert "paip-c: PAIP data use agreement" in err and "unk-d: unknown" in err
    assert "open-a" not in err and "nc-b" not in err  # redistributable licences are not refused
    assert fake_hub.requests == []
    # naming only one of them is not enough
    assert run_push(push_args(folder, fake_hub, include_restricted="paip-c")) == 2
    assert "unk-d" in capsys.readouterr().err and fake_hub.requests == []
    with pytest.raises(ValueError, match="not-there"):
        run_push(push_args(folder, fake_hub, include_restricted="paip-c,not-there"))


def test_private_by_default_with_gating_and_licence_metadata(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    folder = built_folder(tmp_path / "cpia", SUBSETS)
    assert run_push(push_args(folder, fake_hub, include_restricted="paip-c, unk-d")) == 0
    assert fake_hub.created[0]["visibility"] == "private"
    received = fake_hub.received_files("dataset", "someone/cpia")
    text = received["README.md"].decode()
    assert REPO_PLACEHOLDER not in text and 'load_dataset("someone/cpia")' in text
    metadata, _ = split_card(text)
    assert metadata["license"] == ["cc-by-4.0", "cc-by-nc-sa-4.0", "other"]
    assert metadata["license_link"] == "LICENSES.md" and "LICENSES.md" in received
    assert "non-commercial" in metadata["extra_gated_prompt"]
    assert any(kind == "checkbox" for kind in metadata["extra_gated_fields"].values())
    assert metadata["configs"][0]["config_name"] == "full"  # the rest of the metadata is kept
    licences = received["LICENSES.md"].decode()
    assert all(f"| {s} | {lic} |" in licences for s, lic in SUBSETS.items())


def test_public_only_when_asked_and_no_gating_for_open_licences(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    folder = built_folder(tmp_path / "cpia", {"open-a": "CC-BY-4.0", "cc0-e": "CC0-1.0"})
    assert run_push(push_args(folder, fake_hub, public=True)) == 0
    assert fake_hub.created[0]["visibility"] == "public"
    metadata = yaml.safe_load(fake_hub.received_files("dataset", "someone/cpia")["README.md"].decode().split("---\n")[1])
    assert metadata["license"] == ["cc-by-4.0", "cc0-1.0"]
    assert "extra_gated_prompt" not in metadata and "license_name" not in metadata
    assert metadata["license_link"] == "LICENSES.md"  # each subset keeps its licence: always listed


def local_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def test_a_push_to_another_id_gets_its_own_card_and_the_folder_stays_as_built(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    folder = built_folder(tmp_path / "cpia", {"open-a": "CC-BY-4.0"})
    built = local_bytes(folder)
    assert run_push(push_args(folder, fake_hub, repo_id="me/CPIA")) == 0
    assert run_push(push_args(folder, fake_hub, repo_id="other/CPIA")) == 0
    assert local_bytes(folder) == built  # nothing written into the folder (the push log lives under .cache)
    first = fake_hub.received_files("dataset", "me/CPIA")["README.md"].decode()
    second = fake_hub.received_files("dataset", "other/CPIA")["README.md"].decode()
    assert 'load_dataset("me/CPIA")' in first and "other/CPIA" not in first
    assert 'load_dataset("other/CPIA")' in second and "me/CPIA" not in second
    assert split_card(first)[0] == split_card(second)[0]
