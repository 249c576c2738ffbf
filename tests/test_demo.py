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


def test_no_progress_shows_no_bar_at_all(demo_build: Path, tmp_path: Path, capfd) -> None:
    import logging

    if hasattr(logging.Logger, "warning_once"):  # transformers says some things once per process
        logging.Logger.warning_once.cache_clear()
    model_dir = train_demo_model(demo_build / "dataset", tmp_path / "mae", progress=False)
    features = demo_features(model_dir, demo_build / "dataset", progress=False)
    err = capfd.readouterr().err  # file descriptors: the libraries' bars and logs write to the real stderr
    for bar in ("pre-training", "Writing model shards", "Loading weights", "it/s", "%|"):
        assert bar not in err, (bar, err[-2000:])
    assert "torchvision backend" not in err  # the root's processor exists for PIL only, and is asked for as such
    assert features.shape == (4, 192) and (tmp_path / "mae" / "model" / "model.safetensors").is_file()
    # the libraries' own switches are back as they were
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()
