"""kaiko-eva as a client of a CPIA export: eva's backbone wrappers load the export unchanged and give its
features, and the documented eva recipe (`recipes/eva/bach_offline.yaml`) run on a BACH-layout dataset
agrees with `cpia eval`'s linear probe on the same features and splits.

The dataset is made here: 4 x 100 generated tiles in BACH's folder layout (eva's BACH class takes its
train / val split by fixed index ranges of that layout, so 400 files give its real 268 / 132 split).
The encoder is a tiny random ViT exported by `cpia export`, with a non-default normalisation.
Runs where `kaiko-eva[vision]` is installed (e.g. `pip install -e .[eva]`).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("eva.vision", reason="kaiko-eva[vision] is not installed")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from eva.core.models.transforms import ExtractCLSFeatures  # noqa: E402
from eva.core.models.wrappers import HuggingFaceModel  # noqa: E402
from eva.vision.data.datasets import BACH  # noqa: E402
from eva.vision.data.transforms.common import ResizeAndCrop  # noqa: E402
from eva.vision.models.wrappers import TimmModel  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from cpia_hf.cli import main as cpia  # noqa: E402
from cpia_hf.evaluate.models import load_encoder  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "eva" / "bach_offline.yaml"
VIT_ARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
MEAN, STD = (0.70, 0.55, 0.68), (0.16, 0.19, 0.14)
CLASSES = ["Benign", "InSitu", "Invasive", "Normal"]  # BACH's folders, in its class-id order
BASE_COLOURS = np.array([[200, 80, 150], [175, 105, 165], [160, 120, 140], [195, 95, 120]], dtype=np.float64)
SEEDS = 3


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A tiny random ViT (weights perturbed off timm's zero inits) written by `cpia export --weights`."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="token", **VIT_ARGS)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "encoder.safetensors"))
    (root / "card_context.json").write_text(json.dumps({"mean": list(MEAN), "std": list(STD)}))
    out = root / "cpia-tiny"
    assert cpia(["export", "--weights", str(root / "encoder.safetensors"), "--model", "vit_tiny_patch16_224",
                 "--model-args", json.dumps(VIT_ARGS), "--card-context", str(root / "card_context.json"),
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bach_root(tmp_path_factory) -> Path:
    """BACH's layout, ICIAR2018_BACH_Challenge/Photos/<class>/*.tif, 100 noisy tiles of a class colour each."""
    root = tmp_path_factory.mktemp("bach")
    rng = np.random.default_rng(0)
    side = VIT_ARGS["img_size"]  # the input size: eva's resize and ours are then both the identity
    for class_id, name in enumerate(CLASSES):
        folder = root / "ICIAR2018_BACH_Challenge" / "Photos" / name
        folder.mkdir(parents=True)
        for index in range(100):
            colour = BASE_COLOURS[class_id] + rng.normal(0, 8, 3)
            pixels = colour + rng.normal(0, 25, (side, side, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name.lower()}{index:03d}.tif")
    return root


def recipe_backbone(model_name: str):
    """The backbone exactly as the recipe declares it, with `CPIA_MODEL` filled in."""
    config = yaml.safe_load(RECIPE.read_text())
    writer = next(c for c in config["trainer"]["init_args"]["callbacks"] if c["class_path"].endswith("EmbeddingsWriter"))
    backbone = writer["init_args"]["backbone"]
    assert backbone["class_path"] == "eva.vision.models.wrappers.TimmModel"
    init_args = {**backbone["init_args"], "model_name": model_name}
    return TimmModel(**init_args).eval()


def eva_images(bach_root: Path, count: int) -> tuple[torch.Tensor, list[Path]]:
    """The first `count` train images through eva's BACH dataset and the recipe's transform."""
    dataset = BACH(str(bach_root), split="train", transforms=ResizeAndCrop(size=VIT_ARGS["img_size"], mean=MEAN, std=STD))
    dataset.setup()
    photos = bach_root / "ICIAR2018_BACH_Challenge" / "Photos"
    images = torch.stack([dataset[index][0] for index in range(count)])
    return images, [photos / dataset.filename(index) for index in range(count)]


def test_eva_wrappers_give_the_exports_features(export_dir, bach_root):
    encoder = load_encoder(str(export_dir))
    assert encoder.preprocessing.mean == MEAN and encoder.preprocessing.input_size == (32, 32)
    images, paths = eva_images(bach_root, 24)
    ours = torch.stack([encoder.preprocessing.eval_transform()(Image.open(path)) for path in paths])
    torch.testing.assert_close(images, ours, rtol=0, atol=1e-6)  # eva's and cpia's pixels, same normalisation

    with torch.no_grad():
        expected = encoder.module.eval()(ours)
        from_timm = recipe_backbone(f"local-dir:{export_dir}")(images)
        from_transformers = HuggingFaceModel(str(export_dir / "vit"), transforms=ExtractCLSFeatures()).eval()(images)
    assert expected.shape == (24, 48) and expected.std(0).min() > 1e-3  # features vary across images
    torch.testing.assert_close(from_timm, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_transformers, expected, rtol=1e-4, atol=1e-4)


def run_recipe(export_dir: Path, bach_root: Path, work: Path) -> tuple[dict, list[dict]]:
    """`python -m eva predict_fit` on the recipe, shrunk for CI; eva's results.json and embeddings manifest."""
    env = {
        **os.environ,
        "CPIA_MODEL": f"local-dir:{export_dir}", "IN_FEATURES": "48", "RESIZE_DIM": "32",
        "NORMALIZE_MEAN": json.dumps(list(MEAN)), "NORMALIZE_STD": json.dumps(list(STD)),
        "DATA_ROOT": str(bach_root), "EMBEDDINGS_ROOT": str(work / "embeddings"), "OUTPUT_ROOT": str(work / "logs"),
        # a few short runs: full-batch-sized SGD steps at a higher rate than eva's 12500 steps at 6.25e-4
        "N_RUNS": str(SEEDS), "MAX_STEPS": "40", "LR_VALUE": "0.1",
        "NUM_WORKERS": "0", "PERSISTENT_WORKERS": "false", "PREFETCH_FACTOR": "null", "TQDM_DISABLE": "1",
    }
    done = subprocess.run([sys.executable, "-m", "eva", "predict_fit", "--config", str(RECIPE)],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = (work / "logs").glob("*/results.json")
    with open(work / "embeddings" / "manifest.csv", newline="") as manifest:
        return json.loads(results_file.read_text()), list(csv.DictReader(manifest))


def write_cpia_splits(rows: list[dict], photos: Path, out: Path) -> None:
    """eva's splits as parquet: train, and eva's val as validation and test (eva selects and reports on val)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    for split, eva_split in (("train", "train"), ("validation", "val"), ("test", "val")):
        chosen = [row for row in rows if row["split"] == eva_split]
        table = {"image": [str(photos / row["origin"]) for row in chosen], "label": [int(row["target"]) for row in chosen]}
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))


def test_eva_recipe_linear_probe_agrees_with_cpia_eval(export_dir, bach_root, tmp_path):
    results, rows = run_recipe(export_dir, bach_root, tmp_path)
    assert len(rows) == 400 and {row["split"] for row in rows} == {"train", "val"}
    assert sum(row["split"] == "val" for row in rows) == 132  # BACH's own split

    # eva's stored embeddings are the export's features of the same images
    photos = bach_root / "ICIAR2018_BACH_Challenge" / "Photos"
    encoder = load_encoder(str(export_dir))
    sample = rows[::40]
    with torch.no_grad():
        ours = encoder.module.eval()(torch.stack(
            [encoder.preprocessing.eval_transform()(Image.open(photos / row["origin"])) for row in sample]))
    theirs = torch.stack([torch.load(tmp_path / "embeddings" / row["embeddings"])[0] for row in sample])
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    write_cpia_splits(rows, photos, tmp_path / "cpia-data")
    assert cpia(["eval", "--model", str(export_dir), "--data", str(tmp_path / "cpia-data"), "--protocol", "linear",
                 "--linear-seeds", str(SEEDS), "--out", str(tmp_path / "cpia-eval"), "--num-workers", "0"]) == 0
    metrics = json.loads((tmp_path / "cpia-eval" / "metrics.json").read_text())
    assert metrics["split_sizes"] == {"train": 268, "validation": 132, "test": 132}

    # eva's MulticlassAccuracy averages per class (torchmetrics' default "macro"): cpia's balanced accuracy
    eva_values = results["metrics"]["val"][0]["val/MulticlassAccuracy"]["values"]
    cpia_values = [run["test"]["balanced_accuracy"] for run in metrics["protocols"]["linear"]["runs"]]
    assert len(eva_values) == len(cpia_values) == SEEDS
    # the seeds' spread, at least what one image of the smallest validation class (23 of 132) moves
    spread = max(statistics.stdev(eva_values), statistics.stdev(cpia_values), 1 / (len(CLASSES) * 23))
    gap = abs(statistics.mean(eva_values) - statistics.mean(cpia_values))
    print(f"eva {eva_values} cpia {cpia_values} gap {gap:.4f} spread {spread:.4f}")
    assert gap <= 2 * spread, (eva_values, cpia_values)
    assert min(eva_values + cpia_values) > 0.5  # both probes learn the classes (chance: 0.25)
