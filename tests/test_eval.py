"""Tests of `cpia eval` on small generated labelled datasets whose classes differ in colour and texture.

The feature extractor is a tiny timm ViT with random initialisation (no weights can be downloaded
here): its frozen features still separate classes of different colour and texture, which is what
kNN and the linear probe must find, and cannot separate labels shuffled independently of the images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from cpia_hf.evaluate import cli
from cpia_hf.evaluate import features as features_module
from cpia_hf.evaluate.data import load_labelled_data
from cpia_hf.evaluate.metrics import classification_metrics, evaluation_results, summarize
from cpia_hf.evaluate.models import load_encoder
from cpia_hf.evaluate.protocols import Classifier, layer_decay_param_groups

CLASS_NAMES = ["red", "green", "blue"]
BASE_COLOURS = np.array([[200, 60, 80], [70, 170, 90], [60, 80, 190]], dtype=np.float64)
SIDE = 32
VIT_ARGS = dict(img_size=SIDE, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def make_image(class_id: int, rng: np.random.Generator) -> Image.Image:
    """A tile of the class colour (jittered) with noise; class 2 also carries stripes."""
    colour = BASE_COLOURS[class_id] + rng.normal(0, 15, 3)
    pixels = colour + rng.normal(0, 20, (SIDE, SIDE, 3))
    if class_id == 2:
        pixels[::4] *= 0.6
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_split(path: Path, class_ids: list[int], rng: np.random.Generator, string_labels: bool,
                labels: list[int] | None = None) -> None:
    """A parquet split of generated tiles; `labels` (default: the true classes) are the stored labels."""
    labels = class_ids if labels is None else labels
    images = [make_image(class_id, rng) for class_id in class_ids]
    if string_labels:
        table = {"image": images, "label": [CLASS_NAMES[label] for label in labels]}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    else:
        table = {"image": images, "label": labels}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))


def balanced(per_class: int) -> list[int]:
    return [class_id for class_id in range(len(CLASS_NAMES)) for _ in range(per_class)]


@pytest.fixture(scope="module")
def single_split_dir(tmp_path_factory) -> Path:
    """One split of 3 x 100 tiles with string labels."""
    root = tmp_path_factory.mktemp("single")
    write_split(root / "data" / "train-00000-of-00001.parquet", balanced(100), np.random.default_rng(0), True)
    return root


@pytest.fixture(scope="module")
def shuffled_dir(tmp_path_factory) -> Path:
    """3 x 150 tiles like those of `single_split_dir`, labels permuted independently of the images."""
    root = tmp_path_factory.mktemp("shuffled")
    class_ids = balanced(150)
    labels = np.random.default_rng(1).permutation(class_ids).tolist()
    write_split(root / "data" / "train-00000-of-00001.parquet", class_ids, np.random.default_rng(2), True, labels)
    return root


@pytest.fixture(scope="module")
def three_split_dir(tmp_path_factory) -> Path:
    """train / validation / test parquet files with ClassLabel labels."""
    root = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(3)
    for split, per_class in (("train", 20), ("validation", 4), ("test", 8)):
        write_split(root / "data" / f"{split}-00000-of-00001.parquet", balanced(per_class), rng, False)
    return root


@pytest.fixture(scope="module")
def timm_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny timm ViT saved in the timm/Hub layout."""
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS)
    save_for_hf(model, str(root), model_args=VIT_ARGS, safe_serialization=True)
    return root


def eval_args(model: Path, data: Path, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure_eval(parser)
    return parser.parse_args(["--model", str(model), "--data", str(data), "--out", str(out),
                              "--num-workers", "0", "--batch-size", "32", *extra])


# metrics


def test_metrics_match_hand_computed_confusion_matrix():
    # rows: true class, columns: predicted class
    matrix = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    labels = np.repeat(np.arange(3), matrix.sum(1))
    predictions = np.concatenate([np.repeat(np.arange(3), row) for row in matrix])
    metrics = classification_metrics(labels, np.eye(3)[predictions])
    assert metrics["accuracy"] == pytest.approx(12 / 16)
    assert metrics["balanced_accuracy"] == pytest.approx((5 / 6 + 3 / 6 + 4 / 4) / 3)
    # F1 = 2 TP / (2 TP + FP + FN) per class: 10/13, 6/10, 8/9
    assert metrics["macro_f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert "auroc" not in metrics


def test_macro_f1_counts_a_class_never_predicted_nor_present():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.eye(3)[[0, 1, 1, 1]]
    # class 0: F1 = 2/3, class 1: F1 = 4/5, class 2 (absent, never predicted): 0
    assert classification_metrics(labels, probabilities)["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)


def test_auroc_for_two_classes():
    labels = np.array([1, 1, 0, 0])
    positive = np.array([0.9, 0.4, 0.5, 0.1])
    metrics = classification_metrics(labels, np.stack([1 - positive, positive], 1))
    # positive-negative pairs ranked right: (0.9 > 0.5), (0.9 > 0.1), (0.4 > 0.1); wrong: (0.4 < 0.5)
    assert metrics["auroc"] == pytest.approx(3 / 4)
    assert metrics["accuracy"] == pytest.approx(3 / 4)


def test_summary_is_mean_and_sample_std():
    summary = summarize([{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.9}])
    assert summary["accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["accuracy"]["std"] == pytest.approx(0.2)
    assert summary["accuracy"]["runs"] == 3


# splits


def test_single_split_is_made_stratified_7_1_2_and_reproducible(single_split_dir):
    first = load_labelled_data(str(single_split_dir), seed=0).record()
    again = load_labelled_data(str(single_split_dir), seed=0).record()
    other_seed = load_labelled_data(str(single_split_dir), seed=1).record()
    assert first == again
    assert first["splits"]["test"]["indices"] != other_seed["splits"]["test"]["indices"]
    assert first["classes"] == sorted(CLASS_NAMES)  # string labels: sorted names
    splits = first["splits"]
    assert {name: split["count"] for name, split in splits.items()} == {"train": 210, "validation": 30, "test": 60}
    for name, per_class in (("train", 70), ("validation", 10), ("test", 20)):
        assert splits[name]["made"] and splits[name]["source_split"] == "train"
        assert set(splits[name]["class_counts"].values()) == {per_class}
    rows = [row for split in splits.values() for row in split["indices"]]
    assert sorted(rows) == list(range(300))  # disjoint and complete


def test_given_splits_are_kept_with_class_label_names(three_split_dir):
    data = load_labelled_data(str(three_split_dir))
    record = data.record()
    assert record["classes"] == CLASS_NAMES  # ClassLabel order kept
    for name, count in (("train", 60), ("validation", 12), ("test", 24)):
        assert record["splits"][name]["source_split"] == name
        assert not record["splits"][name]["made"]
        assert record["splits"][name]["indices"] == list(range(count))
    assert data.splits["test"].labels.tolist() == balanced(8)


def test_missing_validation_is_made_from_train(tmp_path):
    rng = np.random.default_rng(4)
    write_split(tmp_path / "data" / "train-00000-of-00001.parquet", balanced(16), rng, False)
    write_split(tmp_path / "data" / "test-00000-of-00001.parquet", balanced(4), rng, False)
    record = load_labelled_data(str(tmp_path)).record()["splits"]
    assert record["test"]["source_split"] == "test" and not record["test"]["made"]
    assert record["validation"]["made"] and record["validation"]["count"] == 6  # 1/8 of 48
    assert record["train"]["count"] == 42
    assert not set(record["train"]["indices"]) & set(record["validation"]["indices"])


def test_valid_split_and_bool_labels_as_on_the_hub(tmp_path, timm_model_dir):
    """A dataset laid out like PatchCamelyon on the Hub: YAML-declared `valid` split, boolean labels."""
    rng = np.random.default_rng(5)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("bool")})
    for split, per_class in (("train", 20), ("valid", 4), ("test", 8)):
        class_ids = [0] * per_class + [2] * per_class
        table = {"image": [make_image(class_id, rng) for class_id in class_ids],
                 "label": [class_id == 2 for class_id in class_ids]}
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp_path / "data" / f"{split}.parquet"))
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: data/{split}.parquet\n" for split in ("train", "valid", "test"))
        + "---\n")
    out = tmp_path / "out"
    assert cli.run_eval(eval_args(timm_model_dir, tmp_path, out, "--protocol", "knn")) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert splits["classes"] == ["False", "True"]
    assert splits["splits"]["validation"]["source_split"] == "valid"
    assert splits["splits"]["test"]["class_counts"] == {"False": 8, "True": 8}
    test = json.loads((out / "metrics.json").read_text())["protocols"]["knn"]["summary"]["test"]
    assert 0.9 < test["auroc"]["mean"] <= 1.0
    assert "| AUROC |" in (out / "results.md").read_text()


def test_missing_label_column_is_a_clear_error(three_split_dir, tmp_path, timm_model_dir, capsys):
    status = cli.run_eval(eval_args(timm_model_dir, three_split_dir, tmp_path, "--label-column", "diagnosis"))
    assert status == 2
    assert "no column 'diagnosis'" in capsys.readouterr().err


# models


def test_timm_folder_loads_its_weights(timm_model_dir):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS).eval()
    encoder = load_encoder(str(timm_model_dir))
    assert encoder.preprocessing.input_size == (SIDE, SIDE)
    assert encoder.num_features == 64
    images = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(encoder.module(images), reference(images))


def test_transformers_vit_folder_gives_cls_token(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=SIDE, patch_size=8)
    torch.manual_seed(0)
    model = ViTModel(config).eval()
    model.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=[0.6, 0.5, 0.4],
                      image_std=[0.2, 0.2, 0.2]).save_pretrained(tmp_path)
    encoder = load_encoder(str(tmp_path))
    assert encoder.preprocessing.mean == (0.6, 0.5, 0.4)
    assert encoder.preprocessing.input_size == (SIDE, SIDE)
    images = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(encoder.module(images), model(pixel_values=images).last_hidden_state[:, 0])


def test_layer_decay_scales_learning_rate_by_depth(timm_model_dir):
    encoder = load_encoder(str(timm_model_dir))
    model = Classifier(encoder.module, encoder.num_features, 3)
    scale_of = {}
    for group in layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.5):
        for param in group["params"]:
            scale_of[id(param)] = group["lr_scale"]
    backbone = model.backbone
    # groups: stem (embeddings), block 0, block 1, final norm / head
    assert scale_of[id(backbone.patch_embed.proj.weight)] == pytest.approx(0.5 ** 3)
    assert scale_of[id(backbone.blocks[0].attn.qkv.weight)] == pytest.approx(0.5 ** 2)
    assert scale_of[id(backbone.blocks[1].attn.qkv.weight)] == pytest.approx(0.5)
    assert scale_of[id(model.head.weight)] == 1.0


# protocols end to end


def test_knn_and_linear_probe_separate_colour_classes(single_split_dir, timm_model_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.run_eval(eval_args(timm_model_dir, single_split_dir, out,
                             "--protocol", "knn", "linear", "--linear-seeds", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split_sizes"] == {"train": 210, "validation": 30, "test": 60}
    knn_test = metrics["protocols"]["knn"]["summary"]["test"]
    linear_test = metrics["protocols"]["linear"]["summary"]["test"]
    assert knn_test["accuracy"]["mean"] > 0.9
    assert linear_test["accuracy"]["mean"] > 0.9
    assert linear_test["macro_f1"]["runs"] == 3
    assert [run["seed"] for run in metrics["protocols"]["linear"]["runs"]] == [0, 1, 2]
    splits = json.loads((out / "splits.json").read_text())
    assert splits == load_labelled_data(str(single_split_dir)).record()
    table = (out / "results.md").read_text()
    knn_row = next(line for line in table.splitlines() if line.startswith("| kNN (k=20, T=0.07) |"))
    assert f"| {100 * knn_test['accuracy']['mean']:.2f} |" in knn_row
    assert "Linear probe (3 seeds)" in table
    assert len(list((out / "cache").glob("*.safetensors"))) == 3

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    # a second run with the same model and data reads the cached features
    original = features_module.predict
    features_module.predict = no_extraction
    try:
        assert cli.run_eval(eval_args(timm_model_dir, single_split_dir, out, "--protocol", "knn")) == 0
    finally:
        features_module.predict = original
    rerun = json.loads((out / "metrics.json").read_text())
    assert rerun["protocols"]["knn"]["summary"] == metrics["protocols"]["knn"]["summary"]


def test_shuffled_labels_stay_at_chance(shuffled_dir, timm_model_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.run_eval(eval_args(timm_model_dir, shuffled_dir, out,
                             "--protocol", "knn", "linear", "--linear-seeds", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    chance = 1 / 3
    # 90 test images: one standard deviation of the accuracy at chance is about 0.05
    for protocol in ("knn", "linear"):
        accuracy = metrics["protocols"][protocol]["summary"]["test"]["accuracy"]["mean"]
        assert abs(accuracy - chance) < 0.2, (protocol, accuracy)


def test_finetune_runs_two_epochs_on_cpu(three_split_dir, timm_model_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.run_eval(eval_args(timm_model_dir, three_split_dir, out, "--protocol", "finetune", "--epochs", "2",
                             "--warmup-epochs", "1", "--lr", "1e-2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    run = metrics["protocols"]["finetune"]["runs"][0]
    assert [epoch["epoch"] for epoch in run["epochs"]] == [1, 2]
    accuracies = [epoch["validation"]["accuracy"] for epoch in run["epochs"]]
    assert run["best_epoch"] == 1 + int(np.argmax(accuracies))
    assert run["validation"]["accuracy"] == pytest.approx(max(accuracies))
    assert sum(map(sum, run["test_confusion_matrix"])) == 24
    assert metrics["protocols"]["finetune"]["settings"]["epochs"] == 2
    assert "Fine-tuning (2 epochs, 1 seed)" in (out / "results.md").read_text()


def test_results_for_the_model_card(three_split_dir, timm_model_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.run_eval(eval_args(timm_model_dir, three_split_dir, out, "--protocol", "knn",
                             "--dataset-name", "owner/colours")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    results = evaluation_results(metrics)
    assert {result["metric"] for result in results} == {"accuracy", "balanced_accuracy", "macro_f1"}
    accuracy = next(result for result in results if result["metric"] == "accuracy")
    assert accuracy == {
        "task": "image-classification", "dataset": "owner/colours", "dataset_config": None, "split": "test",
        "protocol": "knn", "metric": "accuracy",
        "value": metrics["protocols"]["knn"]["summary"]["test"]["accuracy"]["mean"], "unit": "fraction",
    }


@pytest.fixture(scope="module")
def exported_model_dir(tmp_path_factory) -> Path:
    """The tiny ViT exported as a CPIA model repo (timm layout at the root, ViTModel in vit/, card)."""
    export = pytest.importorskip("cpia_hf.model.export")
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS)
    export.export_encoder(backbone, root, model_name="cpia-vit-tiny-test", card_context={})
    return root


def test_exported_cpia_model_loads_through_timm_and_transformers(exported_model_dir):
    timm_encoder = load_encoder(str(exported_model_dir))
    vit_encoder = load_encoder(str(exported_model_dir / "vit"))
    assert timm_encoder.preprocessing == vit_encoder.preprocessing
    images = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(timm_encoder.module(images), vit_encoder.module(images), atol=1e-5, rtol=1e-5)


def test_card_folding(three_split_dir, exported_model_dir, tmp_path):
    pytest.importorskip("cpia_hf.model.card")
    card = exported_model_dir / "README.md"
    assert cli.run_eval(eval_args(exported_model_dir, three_split_dir, tmp_path / "out", "--protocol", "knn",
                             "--dataset-name", "owner/colours", "--card", str(card))) == 0
    accuracy = json.loads((tmp_path / "out" / "metrics.json").read_text())["protocols"]["knn"]["summary"]["test"]
    text = card.read_text()
    header = text.split("\n---", 1)[0]
    assert "model-index" in header and "owner/colours" in header
    assert f"value: {accuracy['accuracy']['mean']}" in header
