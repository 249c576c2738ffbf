import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from fakehub import fake_hub  # noqa: F401  (pytest fixture)
from safetensors.torch import save_file

from cpia_hf import hub
from cpia_hf.dataset.cli import run_push
from cpia_hf.model.cli import configure_export, run_export


def shard_bytes(subset: str, rows: int = 3) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"subset": [subset] * rows, "license": ["CC-BY-4.0"] * rows}), sink)
    return sink.getvalue().to_pybytes()


def dataset_folder(root):
    """A small built-dataset folder: card, shards, plus files that must stay local."""
    files = {
        "README.md": b"---\nconfigs:\n- config_name: mini\n  data_files:\n  - split: train\n"
                     b"    path: data/mini/**/*.parquet\n---\n# CPIA test\n",
        "data/mini/M/bach/bach-00000.parquet": shard_bytes("bach"),
        "data/mini/S/wbc/wbc-00000.parquet": shard_bytes("wbc", 5),
        "data/full/L/bach/bach-00000.parquet": shard_bytes("bach", 7),
    }
    local_only = {".work/progress.json": b"{}", "data/mini/M/bach/part.tmp": b"partial", ".git/config": b"[core]"}
    for name, content in {**files, **local_only}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return files


def all_bytes_under(root):
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_cpia_push_uploads_exactly_the_dataset_files(fake_hub, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cpia"
    files = dataset_folder(folder)
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    args = argparse.Namespace(repo=folder, repo_id="someone/cpia-test", public=False, include_restricted="",
                              catalog=None, endpoint=fake_hub.url)

    built = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    assert run_push(args) == 0

    received = fake_hub.received_files("dataset", "someone/cpia-test")
    assert {k: v for k, v in received.items() if k not in ("README.md", "LICENSES.md")} == {
        k: v for k, v in files.items() if k != "README.md"}
    assert received["README.md"].startswith(b"---\nlicense: cc-by-4.0\nlicense_link: LICENSES.md\n")
    assert received["README.md"].endswith(b"# CPIA test\n") and b"| bach | CC-BY-4.0 |" in received["LICENSES.md"]
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {k: v for k, v in local.items() if not k.startswith(".cache/huggingface/")} == built  # left as built
    assert [path for _, path, _ in fake_hub.requests] == [
        "/api/whoami-v2", "/api/repos/create",
        "/api/datasets/someone/cpia-test/preupload/main", "/api/datasets/someone/cpia-test/commit/main",  # data
        "/api/validate-yaml", "/api/datasets/someone/cpia-test/preupload/main",  # then the card
        "/api/datasets/someone/cpia-test/commit/main",
    ]
    assert [c["files"] for c in fake_hub.commits] == [sorted(set(files) - {"README.md"}), ["README.md", "LICENSES.md"]]
    assert fake_hub.created == [{"name": "cpia-test", "organization": "someone", "visibility": "private",
                                 "type": "dataset"}]
    assert {auth for _, _, auth in fake_hub.requests} == {f"Bearer {fake_hub.token}"}
    token = fake_hub.token.encode()
    assert token not in all_bytes_under(fake_hub.root) and token not in all_bytes_under(folder)
    out = capsys.readouterr()
    assert fake_hub.token not in out.out + out.err
    assert "someone/cpia-test" in out.out

    # a second push to the existing repo (409 on create) adds a new shard
    (folder / "data/mini/L/camelyon/camelyon-00000.parquet").parent.mkdir(parents=True)
    (folder / "data/mini/L/camelyon/camelyon-00000.parquet").write_bytes(shard_bytes("camelyon"))
    assert run_push(args) == 0
    received = fake_hub.received_files("dataset", "someone/cpia-test")
    assert received["data/mini/L/camelyon/camelyon-00000.parquet"] == shard_bytes("camelyon")
    assert len(received) == len(files) + 2  # the new shard and LICENSES.md
    assert fake_hub.commits[-2]["files"] == ["data/mini/L/camelyon/camelyon-00000.parquet"]  # only the new file


def test_push_refuses_folders_over_hub_limits_before_any_request(fake_hub, tmp_path, monkeypatch):
    folder = tmp_path / "cpia"
    dataset_folder(folder)
    (folder / "data/mini/M/many").mkdir()
    for index in range(4):
        (folder / f"data/mini/M/many/many-{index:05d}.parquet").write_bytes(b"x")
    for index in range(20):  # ignored files do not count
        (folder / f".work/cache-{index}.json").write_bytes(b"{}")
    monkeypatch.setattr(hub, "HUB_MAX_FOLDER_ENTRIES", 4)
    with pytest.raises(ValueError, match=r"data/mini/M/many: 4 entries"):
        hub.push_folder(folder, "someone/cpia", ignore_patterns=hub.DATASET_IGNORE_PATTERNS,
                        token=fake_hub.token, endpoint=fake_hub.url)
    monkeypatch.setattr(hub, "HUB_MAX_FOLDER_ENTRIES", 10)
    monkeypatch.setattr(hub, "HUB_MAX_FILES", 8)
    assert len(hub.files_to_upload(folder, hub.DATASET_IGNORE_PATTERNS)) == 8
    with pytest.raises(ValueError, match=r"8 files to upload"):
        hub.push_folder(folder, "someone/cpia", ignore_patterns=hub.DATASET_IGNORE_PATTERNS,
                        token=fake_hub.token, endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_push_without_token_fails_clearly(tmp_path, monkeypatch):
    folder = tmp_path / "cpia"
    dataset_folder(folder)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.HubError, match="dataset repo someone/cpia: no Hugging Face token; set HF_TOKEN"):
        hub.push_folder(folder, "someone/cpia", endpoint="http://127.0.0.1:9")


def test_cpia_export_from_weights_pushes_model_repo(fake_hub, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model_args = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **model_args)
    save_file(backbone.state_dict(), tmp_path / "encoder.safetensors")
    context = tmp_path / "run.json"
    context.write_text(json.dumps({"method": "mae", "steps": 3, "loss_history": [[1, 0.9], [2, 0.7], [3, 0.6]]}))
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    parser = argparse.ArgumentParser()
    configure_export(parser)
    out = tmp_path / "cpia-mae-tiny"
    args = parser.parse_args([
        "--weights", str(tmp_path / "encoder.safetensors"), "--model", "vit_tiny_patch16_224",
        "--model-args", json.dumps(model_args), "--out", str(out), "--card-context", str(context),
        "--push-to-hub", "someone/cpia-mae-tiny", "--endpoint", fake_hub.url,
    ])

    assert run_export(args) == 0

    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md", "loss_curve.png", "vit/config.json",
            "vit/model.safetensors", "vit/preprocessor_config.json"} == set(local)
    assert fake_hub.received_files("model", "someone/cpia-mae-tiny") == local
    assert b'timm.create_model("hf-hub:someone/cpia-mae-tiny"' in local["README.md"]
    assert fake_hub.token.encode() not in all_bytes_under(tmp_path)
    reloaded = timm.create_model(f"local-dir:{fake_hub.repo_dir('model', 'someone/cpia-mae-tiny')}", pretrained=True)
    for key, value in backbone.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_train_push_to_hub_uploads_the_exported_model(fake_hub, demo_build, tmp_path, monkeypatch):
    from cpia_hf.demo.demo import DEMO_TRAIN_ARGS
    from cpia_hf.train.cli import main as train_main

    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    out = tmp_path / "run"
    train_main([*DEMO_TRAIN_ARGS, "--data", str(demo_build / "dataset"), "--out", str(out),
                "--push-to-hub", "someone/cpia-demo", "--hub-endpoint", fake_hub.url])
    model = out / "model"
    local = {p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    assert fake_hub.received_files("model", "someone/cpia-demo") == local
    assert 'timm.create_model("hf-hub:someone/cpia-demo"' in local["README.md"].decode()
    assert "cpia_pretraining:" in local["README.md"].decode()  # config and subsets, for cpia eval's leakage check
    assert fake_hub.token.encode() not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
