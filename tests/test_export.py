import json

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, TimmWrapperModel, ViTImageProcessor, ViTModel

from cpia_hf.model.card import update_model_card_evaluation, write_model_card
from cpia_hf.model.export import export_encoder

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=0, global_pool="token",
                dynamic_img_size=False)
MEAN, STD = (0.70, 0.55, 0.68), (0.16, 0.19, 0.14)


def tiny_vit(**overrides):
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, **overrides})
    with torch.no_grad():  # non-trivial values everywhere (timm zero-inits biases and the class token)
        for param in backbone.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return backbone.eval()


def run_context(**extra):
    return {
        "method": "dino", "dataset": "someone/CPIA", "dataset_config": "mini", "steps": 20, "global_batch_size": 16,
        "lr": 5e-4, "augmentations": ["multi-crop", "colour jitter"], "hardware": "1x CPU", "mixed_precision": "no",
        "config": {"method": "dino", "optimizer": {"lr": 5e-4}}, "mean": list(MEAN), "std": list(STD),
        "loss_history": [[step, 4.0 / (1 + step)] for step in range(0, 20, 2)], **extra,
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    backbone = tiny_vit()
    out = tmp_path_factory.mktemp("export") / "cpia-dino-tiny"
    paths = export_encoder(backbone, out, model_name="cpia-dino-tiny", card_context=run_context())
    return backbone, out, paths


def test_export_loads_in_timm_and_transformers_with_same_features(exported):
    backbone, out, _ = exported
    from_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    from_auto = AutoModel.from_pretrained(out).eval()
    from_vit = ViTModel.from_pretrained(out, subfolder="vit", add_pooling_layer=False).eval()
    assert isinstance(from_auto, TimmWrapperModel)

    source = backbone.state_dict()
    for name, loaded in (("timm", from_timm.state_dict()), ("AutoModel", from_auto.timm_model.state_dict())):
        assert loaded.keys() == source.keys(), name
        for key, value in source.items():
            assert torch.equal(loaded[key], value), f"{name}: {key}"
    vit_state = from_vit.state_dict()
    for part in ("weight", "bias"):
        qkv = torch.cat([vit_state[f"layers.1.attention.{p}_proj.{part}"] for p in "qkv"])
        assert torch.equal(qkv, source[f"blocks.1.attn.qkv.{part}"])
    assert torch.equal(vit_state["embeddings.position_embeddings"], source["pos_embed"])
    assert from_vit.pooler is None

    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = backbone.forward_features(pixels)
        tokens = {
            "timm": from_timm.forward_features(pixels),
            "AutoModel": from_auto(pixel_values=pixels).last_hidden_state,
            "ViTModel": from_vit(pixel_values=pixels).last_hidden_state,
        }
        timm_cls = from_timm(pixels)
    assert expected.shape == (3, 17, 48)
    for name, features in tokens.items():
        assert features.shape == expected.shape, name
        assert (features - expected).abs().max() <= 1e-4, name
        assert (features[:, 0] - expected[:, 0]).abs().max() <= 1e-4, name
    assert (timm_cls - expected[:, 0]).abs().max() <= 1e-4


def test_export_writes_configs_and_preprocessing(exported):
    _, out, paths = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert "num_classes" not in config["model_args"]
    assert config["model_args"]["depth"] == 2 and config["model_args"]["embed_dim"] == 48
    assert config["pretrained_cfg"]["mean"] == list(MEAN) and config["pretrained_cfg"]["std"] == list(STD)
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["crop_pct"] == 1.0
    vit_config = json.loads((out / "vit" / "config.json").read_text())
    assert vit_config["layer_norm_eps"] == 1e-6 and vit_config["num_hidden_layers"] == 2
    assert set(load_file(out / "model.safetensors")) == set(tiny_vit().state_dict())
    assert paths["card"] == out / "README.md" and paths["loss_curve"].is_file()

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (45, 45, 3), dtype=np.uint8))
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    processor = ViTImageProcessor.from_pretrained(out, subfolder="vit")
    from_processor = processor(image, return_tensors="pt")["pixel_values"][0]
    from_timm = transform(image)
    assert from_timm.shape == from_processor.shape == (3, 32, 32)
    # same resize, normalisation and layout; the two resizers may round a pixel to the next grey level
    assert (from_timm - from_processor).abs().max() <= 1 / 255 / min(STD) + 1e-4
    assert (from_timm - from_processor).abs().mean() <= 1e-3


@pytest.mark.parametrize("overrides, reason", [
    ({"init_values": 1e-5}, "LayerScale"),
    ({"num_classes": 5}, "head"),
    ({"reg_tokens": 2}, "register"),
    ({"global_pool": "avg", "fc_norm": True}, "fc_norm"),
])
def test_export_refuses_encoders_it_cannot_convert(tmp_path, overrides, reason):
    with pytest.raises(ValueError, match=reason):
        export_encoder(tiny_vit(**overrides), tmp_path / "out", model_name="x", card_context={})
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_model_card_metadata_disclaimer_and_loss_curve(tmp_path):
    evaluation = [{"task": "linear probe", "dataset": "WBC", "metric": "accuracy", "value": 0.875}]
    path = write_model_card(tmp_path, {"model_name": "cpia-dino-tiny", "base_model": "timm/vit_small_patch16_224",
                                       **run_context(evaluation=evaluation)}, repo_id="someone/cpia-dino-tiny")
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "timm" and data["pipeline_tag"] == "image-feature-extraction"
    assert {"pathology", "histology", "self-supervised", "dino"} <= set(data["tags"])
    assert data["datasets"] == ["someone/CPIA"] and data["base_model"] == "timm/vit_small_patch16_224"
    assert data["license"] == "other"
    [entry] = data["model-index"]
    assert entry["name"] == "cpia-dino-tiny"
    assert entry["results"][0]["metrics"][0] == {"type": "accuracy", "value": 0.875}
    assert "**Not for clinical decisions.**" in card.text
    assert 'timm.create_model("hf-hub:someone/cpia-dino-tiny"' in card.text
    assert 'ViTModel.from_pretrained("someone/cpia-dino-tiny", subfolder="vit"' in card.text
    assert "| Global batch | 16 |" in card.text and "multi-crop, colour jitter" in card.text
    assert "| linear probe | WBC |  |  | accuracy | 0.875 |" in card.text
    assert "10.1016/j.bspc.2025.108148" in card.text
    assert "![Training loss](loss_curve.png)" in card.text
    curve = tmp_path / "loss_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(curve).size == (600, 350)


def test_model_card_without_evaluation_or_history(tmp_path):
    context = {"model_name": "bare", "license": "apache-2.0", "dataset": str(tmp_path / "data" / "cpia-demo")}
    card = ModelCard.load(write_model_card(tmp_path, context))
    assert card.data.datasets is None and str(tmp_path) not in card.content  # a local folder is no Hub id
    assert "cpia-demo" in card.text
    assert "model-index" not in card.data.to_dict() and card.data.license == "apache-2.0"
    assert "No evaluation recorded yet" in card.text and "Training loss" not in card.text
    assert not (tmp_path / "loss_curve.png").exists()
    assert "**Not for clinical decisions.**" in card.text


def test_update_model_card_evaluation_merges_results(tmp_path):
    path = write_model_card(tmp_path, {"model_name": "cpia-mae-tiny", **run_context(method="mae")})
    update_model_card_evaluation(path, [
        {"task": "linear probe", "dataset": "WBC", "metric": "accuracy", "value": 0.5, "split": "test"},
        {"task": "linear probe", "dataset": "pRCC", "metric": "f1", "value": 0.25, "split": "test"},
    ])
    update_model_card_evaluation(path, [
        {"task": "linear probe", "dataset": "WBC", "metric": "accuracy", "value": 0.75, "split": "test"},
    ])
    card = ModelCard.load(path)
    values = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values == {("WBC", "accuracy"): 0.75, ("pRCC", "f1"): 0.25}
    assert "| linear probe | WBC | test |  | accuracy | 0.75 |" in card.text
    assert "| 0.5 |" not in card.text and "No evaluation recorded yet" not in card.text
    assert card.data.to_dict()["model-index"][0]["name"] == "cpia-mae-tiny"
    assert card.text.count("## Evaluation") == 1 and "**Not for clinical decisions.**" in card.text


def test_card_keeps_results_of_different_protocols_apart(tmp_path):
    path = write_model_card(tmp_path, {"model_name": "cpia-mae-tiny", **run_context(method="mae")})
    common = {"task": "image-classification", "dataset": "WBC", "metric": "accuracy", "split": "test"}
    update_model_card_evaluation(path, [{**common, "protocol": "knn", "value": 0.8}])
    update_model_card_evaluation(path, [{**common, "protocol": "linear", "value": 0.9}])
    update_model_card_evaluation(path, [{**common, "protocol": "knn", "value": 0.85}])
    card = ModelCard.load(path)
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"accuracy (knn)": 0.85, "accuracy (linear)": 0.9}
    assert "| image-classification | WBC | test | knn | accuracy | 0.85 |" in card.text
    assert "| image-classification | WBC | test | linear | accuracy | 0.9 |" in card.text


def test_vit_export_pools_to_the_class_token_with_no_weight_made_at_load(exported):
    from transformers import pipeline

    backbone, out, _ = exported
    model, info = ViTModel.from_pretrained(out / "vit", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    pooled = []
    for seed in (0, 1):  # a pooler made at load would draw different weights under different seeds
        torch.manual_seed(seed)
        extractor = pipeline("image-feature-extraction", model=str(out / "vit"), pool=True, framework="pt")
        pooled.append(torch.as_tensor(np.asarray(extractor(image, return_tensors=False))).reshape(-1))
    assert torch.equal(pooled[0], pooled[1])
    pixels = ViTImageProcessor.from_pretrained(out / "vit")(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls_token = backbone.forward_features(pixels)[0, 0]
    assert (pooled[0] - cls_token).abs().max() <= 1e-4


def test_timm_and_vit_preprocess_a_non_square_tile_alike(exported):
    _, out, _ = exported
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    from_timm = transform(image)
    from_processor = ViTImageProcessor.from_pretrained(out, subfolder="vit")(image, return_tensors="pt")["pixel_values"][0]
    assert from_timm.shape == from_processor.shape == (3, 32, 32)
    # the whole tile, squashed: a centre crop would differ by whole grey levels at the sides
    assert (from_timm - from_processor).abs().max() <= 1 / 255 / min(STD) + 1e-4
    assert (from_timm - from_processor).abs().mean() <= 1e-3


def test_card_states_the_real_architecture_resolution_and_embedding(tmp_path):
    backbone = tiny_vit()
    context = run_context(input_mpp={"M": 0.4942, "S": 0.1235}, dataset_config="mini",
                          evaluation=[{"task": "image-classification", "dataset": "WBC", "metric": "accuracy",
                                       "value": 0.9758, "std": 0.0012, "runs": 5, "split": "test",
                                       "protocol": "linear"}])
    paths = export_encoder(backbone, tmp_path / "m", model_name="m", card_context=context)
    text = paths["card"].read_text()
    assert "depth 2, width 48, 3 heads, patch 8 px, 32x32 px input" in text
    assert "embed_dim=48" in text and "depth=2" in text and "img_size=32" in text  # overrides of vit_tiny
    assert "M 0.4942 µm/px, S 0.1235 µm/px" in text and "CLS token" in text
    assert "| 0.9758 ± 0.0012 (5 runs) |" in text and "fractions in [0, 1]" in text
    # the spread survives a later update of the card (kept in model-index metric_args)
    update_model_card_evaluation(paths["card"], [{"task": "image-classification", "dataset": "pRCC",
                                                  "metric": "accuracy", "value": 0.9, "split": "test"}])
    assert "| 0.9758 ± 0.0012 (5 runs) |" in paths["card"].read_text()


def test_card_context_round_trips_through_json(tmp_path):
    from cpia_hf.model.card import ModelCardContext

    context = ModelCardContext.from_dict(run_context(model_name="x", base_model="timm/vit_small_patch16_224"))
    path = context.write(tmp_path / "card_context.json")
    assert ModelCardContext.read(path) == context
    with pytest.raises(ValueError, match="unknown card context key"):
        ModelCardContext.from_dict({"model_name": "x", "datset": "typo"})


def test_cpia_export_reads_a_card_context_file(tmp_path):
    import argparse

    from safetensors.torch import save_file

    from cpia_hf.model.card import ModelCardContext
    from cpia_hf.model.cli import configure_export, run_export

    backbone = tiny_vit()
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / "w.safetensors"))
    ModelCardContext.from_dict(run_context(method="mocov3")).write(tmp_path / "context.json")
    parser = argparse.ArgumentParser()
    configure_export(parser)
    args = parser.parse_args(["--weights", str(tmp_path / "w.safetensors"), "--model", "vit_tiny_patch16_224",
                              "--model-args", json.dumps({k: v for k, v in TINY_VIT.items() if k != "num_classes"}),
                              "--out", str(tmp_path / "out"), "--card-context", str(tmp_path / "context.json")])
    assert run_export(args) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.datasets == ["someone/CPIA"] and "mocov3" in card.data.tags
    assert "| Global batch | 16 |" in card.text and "depth 2, width 48, 3 heads" in card.text
    (tmp_path / "bad.json").write_text('{"model_name": "x", "lr_typo": 1}')
    args.card_context = tmp_path / "bad.json"
    with pytest.raises(ValueError, match="bad.json: unknown card context key"):
        run_export(args)


def test_cpia_export_no_progress_writes_without_bars(tmp_path, capfd):
    import argparse

    from safetensors.torch import save_file

    from cpia_hf.model.cli import configure_export, run_export

    backbone = tiny_vit()
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / "w.safetensors"))
    parser = argparse.ArgumentParser()
    configure_export(parser)
    argv = ["--weights", str(tmp_path / "w.safetensors"), "--model", "vit_tiny_patch16_224",
            "--model-args", json.dumps({k: v for k, v in TINY_VIT.items() if k != "num_classes"})]
    assert run_export(parser.parse_args([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"])) == 0
    assert "Writing model shards" not in capfd.readouterr().err
    assert run_export(parser.parse_args([*argv, "--out", str(tmp_path / "loud")])) == 0
    assert "Writing model shards" in capfd.readouterr().err  # the bar the flag silences
    assert (tmp_path / "quiet" / "vit" / "model.safetensors").read_bytes() == \
        (tmp_path / "loud" / "vit" / "model.safetensors").read_bytes()
