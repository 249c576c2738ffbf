"""Benchmark leakage: the model card records the pre-training subsets; `cpia eval` warns on a leaked benchmark."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from test_eval import VIT_ARGS, balanced, eval_args, write_split

from cpia_hf.dataset.card import pretraining_record
from cpia_hf.dataset.catalog import default_catalog_path, load_catalog
from cpia_hf.evaluate import cli
from cpia_hf.evaluate.leakage import EvaluatedSplit, dataset_aliases, find_leaks, leak_text

PRETRAINING = {"dataset": "someone/CPIA", "config": "mini", "subsets": ["PCam", "TCGA-BRCA", "demo-lung-roi"]}
PCAM_BENCHMARKS = ["PatchCamelyon", "1aurent/PatchCamelyon", "zacharielegault/PatchCamelyon"]


def test_find_leaks_matches_names_hub_ids_and_subsets():
    entries = load_catalog(default_catalog_path())
    assert find_leaks(PRETRAINING, dataset_aliases("1aurent/PatchCamelyon"), entries) == [
        {"subset": "PCam", "benchmarks": PCAM_BENCHMARKS, "training_split_only": True, "train_pattern": "train/*.tif"}]
    full = {**PRETRAINING, "config": "full"}
    assert find_leaks(full, dataset_aliases("1aurent/PatchCamelyon"), entries)[0]["training_split_only"] is False
    assert [leak["subset"] for leak in find_leaks(PRETRAINING, dataset_aliases("/data/pcam/"), entries)] == ["PCam"]
    assert [leak["subset"] for leak in find_leaks(PRETRAINING, dataset_aliases("demo-lung-roi"), entries)] == [
        "demo-lung-roi"]
    assert find_leaks(PRETRAINING, dataset_aliases("owner/colours", "colours"), entries) == []
    # NCT-CRC-HE-100K is a benchmark, but not in this model's pre-training subsets
    assert find_leaks(PRETRAINING, dataset_aliases("1aurent/NCT-CRC-HE"), entries) == []


def test_pretraining_record_of_demo_configs(demo_build: Path):
    dataset = demo_build / "dataset"
    mini = pretraining_record(str(dataset), "mini")
    assert mini["dataset"] == "dataset" and mini["config"] == "mini"
    assert mini["subsets"] == ["demo-blood-roi", "demo-breast-wsi", "demo-colon-wsi", "demo-lung-roi"]
    clean = pretraining_record(str(dataset), "mini_clean")["subsets"]
    assert "demo-lung-roi" not in clean and clean
    assert pretraining_record(str(dataset / "nothing"), "mini") is None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(3)
    for split, per_class in (("train", 10), ("validation", 2), ("test", 4)):
        write_split(root / "data" / f"{split}-00000-of-00001.parquet", balanced(per_class), rng, False)
    return root


@pytest.fixture
def trained_model(tmp_path) -> Path:
    from cpia_hf.model.export import export_encoder

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS)
    full = {**PRETRAINING, "config": "full"}  # PCam whole, its test split included
    export_encoder(backbone, tmp_path / "model", model_name="cpia-vit-tiny", card_context={"pretraining": full})
    return tmp_path / "model"


def test_eval_warns_on_a_leaked_benchmark(data_dir, trained_model, tmp_path, capsys):
    card = trained_model / "README.md"
    assert "cpia_pretraining:" in card.read_text() and "3 sub-datasets" in card.read_text()
    out = tmp_path / "leaked"
    assert cli.run_eval(eval_args(trained_model, data_dir, out, "--dataset-name", "1aurent/PatchCamelyon",
                                  "--card", str(card))) == 0
    err = capsys.readouterr().err
    assert "WARNING: benchmark leakage: 1aurent/PatchCamelyon" in err and "PCam" in err
    assert "PCam" in json.loads((out / "metrics.json").read_text())["leakage_warning"]
    assert (out / "results.md").read_text().startswith("> **Warning — benchmark leakage")
    assert card.read_text().count("benchmark leakage: 1aurent/PatchCamelyon") == 1

    clean = tmp_path / "clean"
    assert cli.run_eval(eval_args(trained_model, data_dir, clean, "--dataset-name", "owner/colours")) == 0
    assert "leakage" not in capsys.readouterr().err
    assert "leakage_warning" not in json.loads((clean / "metrics.json").read_text())


def test_leak_names_the_subset_once_and_says_which_splits_were_seen(demo_build: Path):
    entries = load_catalog(default_catalog_path())
    lung = find_leaks(PRETRAINING, dataset_aliases("demo-lung-roi"), entries)[0]
    text, seen = leak_text(lung, EvaluatedSplit("test split"))
    assert text.startswith("demo-lung-roi: ") and "demo-lung-roi (" not in text and "unknown" in text and seen
    demo_entries = load_catalog(demo_build / "sources" / "catalog.yaml")
    lung = find_leaks(PRETRAINING, dataset_aliases("demo-lung-roi"), demo_entries)[0]
    held_out = EvaluatedSplit("test split (which is split `test` of demo-lung-roi)", from_training_split=False)
    text, seen = leak_text(lung, held_out)
    assert not seen and "only its training split (train/**/*.png) entered pre-training" in text
    assert text.endswith("split `test` of demo-lung-roi) was not among them")
    text, seen = leak_text(lung, EvaluatedSplit("test split (made from split `train`)", from_training_split=True))
    assert seen and text.endswith("was among them")
    full = find_leaks({**PRETRAINING, "config": "full"}, dataset_aliases("demo-lung-roi"), demo_entries)[0]
    assert leak_text(full, held_out) == (
        "demo-lung-roi: all of its images entered pre-training, so the evaluated test split (which is split `test` "
        "of demo-lung-roi) was among them", True)


def test_eval_notes_a_benchmark_whose_held_out_split_was_not_seen(data_dir, tmp_path, capsys):
    from cpia_hf.model.export import export_encoder

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS)
    export_encoder(backbone, tmp_path / "model", model_name="m", card_context={"pretraining": PRETRAINING})
    out = tmp_path / "noted"
    assert cli.run_eval(eval_args(tmp_path / "model", data_dir, out, "--dataset-name", "1aurent/PatchCamelyon")) == 0
    err = capsys.readouterr().err
    assert "NOTE: benchmark leakage" in err and "WARNING" not in err
    assert "test split (which is split `test` of 1aurent/PatchCamelyon) was not among them" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "leakage_warning" not in metrics and "only its training split (train/*.tif)" in metrics["leakage_note"]
    assert (out / "results.md").read_text().startswith("> **Note — benchmark leakage")
