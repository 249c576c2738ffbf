"""The README's main command past conversion: a tiny MAE trained, exported and loaded back."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from cpia_hf.demo.demo import demo_features, train_demo_model


def test_demo_trains_exports_and_loads_back(demo_build: Path, tmp_path: Path, capsys) -> None:
    model_dir = train_demo_model(demo_build / "dataset", tmp_path / "mae")
    assert "mae pre-training" in capsys.readouterr().err  # the progress bar
    features = demo_features(model_dir, demo_build / "dataset")
    assert features.shape == (4, 192) and torch.isfinite(features).all()
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True)
    trained = load_file(tmp_path / "mae" / "encoder.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    card = (model_dir / "README.md").read_text()
    assert "cpia-demo-vit-tiny-mae" in card and "Steps | 4 |" in card
    assert str(tmp_path) not in card and str(demo_build) not in card  # no paths of this machine


def test_no_progress_shows_no_training_bar(demo_build: Path, tmp_path: Path, capsys) -> None:
    train_demo_model(demo_build / "dataset", tmp_path / "mae", progress=False)
    assert "pre-training" not in capsys.readouterr().err
    assert (tmp_path / "mae" / "model" / "model.safetensors").is_file()
