"""Dataset card: no placeholder once pushed, full citation, a gallery across subsets and organs, tissue crops."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from cpia_hf.dataset.card import (
    CHART_COLOURS,
    GALLERY_TILE,
    LICENCE_FILE,
    REPO_PLACEHOLDER,
    card_for_repo,
    gallery_tile,
    load_images,
    organ_chart,
    pick_gallery,
    split_card,
    subset_licences,
    tissue_crop,
)

REPO = Path(__file__).resolve().parents[1]

AUTHORS = ("Ying, Nan", "Lei, Yanli", "Zhang, Tianyi", "Lyu, Shangqing", "Chen, Sicheng", "Liu, Zeyu", "Feng, Yunlu",
           "Zhao, Yu", "Zhang, Guanglei")


def test_pick_gallery_spreads_over_organs_and_subsets_and_is_seeded() -> None:
    candidates = [{"subset": f"{organ}-{k}", "organ": organ, "kind": "wsi", "image_id": f"{organ}-{k}-{i}",
                   "tissue_fraction": 0.9 if i % 2 else 0.1}
                  for organ, subsets in (("breast", 3), ("lung", 1), ("skin", 2)) for k in range(subsets)
                  for i in range(50)]
    picked = pick_gallery(candidates, seed=0, count=8)
    assert len(picked) == 8
    assert {r["organ"] for r in picked} == {"breast", "lung", "skin"}
    assert len({r["subset"] for r in picked}) == 6  # every subset before any repeats
    assert all(r["tissue_fraction"] >= 0.5 for r in picked)  # mostly-tissue tiles
    assert pick_gallery(candidates, seed=0, count=8) == picked
    assert pick_gallery(candidates, seed=1, count=8) != picked
    assert len(pick_gallery(candidates[:3], seed=0, count=8)) == 3  # fewer candidates than asked: all of them


def test_tissue_crop_is_centred_on_tissue() -> None:
    pixels = np.full((1000, 1000, 3), 240, np.uint8)
    pixels[700:900, 50:250] = (150, 60, 120)  # tissue in the lower-left corner
    crop = np.asarray(tissue_crop(Image.fromarray(pixels), 400))
    assert crop.shape == (400, 400, 3)
    assert (crop.mean(axis=2) < 200).mean() > 0.2  # the tissue is inside the crop (a centre crop would miss it)
    assert tissue_crop(Image.fromarray(pixels), 2000).size == (1000, 1000)


def test_demo_card_gallery_citation_and_differences(demo_build: Path) -> None:
    text = (demo_build / "dataset" / "README.md").read_text()
    for author in AUTHORS:
        assert author in text
    assert "10.1016/j.bspc.2025.108148" in text and "https://github.com/zhanglab2021/CPIA_Dataset" in text
    assert "### Differences from the original release" in text and "border tiles" in text
    gallery = text.split("## Gallery", 1)[1].split("## How the data was made", 1)[0]
    m_captions = gallery.split("**M**", 1)[1].split("**S**", 1)[0]
    assert len({s for s in ("demo-breast-wsi", "demo-colon-wsi", "demo-lung-roi") if s in m_captions}) >= 2
    assert "480 px crop" in gallery  # L tiles shown as crops
    assert "set_transform" in text and "mix image sizes" in text


def test_built_card_has_licences_and_the_card_for_a_repo_its_id(demo_build: Path) -> None:
    folder = demo_build / "dataset"
    built = {name: (folder / name).read_bytes() for name in ("README.md", LICENCE_FILE)}
    assert REPO_PLACEHOLDER in built["README.md"].decode()
    licences = subset_licences(folder)
    assert licences == {s: "CC-BY-4.0" for s in ("demo-breast-wsi", "demo-colon-wsi", "demo-lung-roi",
                                                  "demo-blood-roi")}
    built_metadata, _ = split_card(built["README.md"].decode())  # written by the build, before any push
    assert built_metadata["license"] == "cc-by-4.0" and built_metadata["license_link"] == LICENCE_FILE
    assert all(f"| {subset} | CC-BY-4.0 |" in built[LICENCE_FILE].decode() for subset in licences)
    card = card_for_repo(folder, "someone/CPIA", licences, {})
    assert {name: (folder / name).read_bytes() for name in built} == built  # rendered in memory only
    text = card["README.md"].decode()
    assert REPO_PLACEHOLDER not in text and 'load_dataset("someone/CPIA", "mini"' in text
    metadata, _ = split_card(text)
    assert metadata == built_metadata and "extra_gated_prompt" not in metadata
    assert [c["config_name"] for c in metadata["configs"]][0] == "full"


def test_model_card_licence_link_dataset_card_and_citation_match_the_dataset_card(tmp_path: Path) -> None:
    import re

    from huggingface_hub import ModelCard

    from cpia_hf.model.card import write_model_card

    dataset_template = (Path(__file__).resolve().parents[1] / "loading_script" / "dataset_card.md.j2").read_text()
    authors = re.search(r"author\s*=\s*\{(.+?)\},", dataset_template).group(1)
    hub = ModelCard.load(write_model_card(tmp_path / "hub", {"model_name": "m", "dataset": "someone/CPIA"}))
    assert hub.data.license == "other" and hub.data.license_name == "cpia-source-licenses"
    assert hub.data.license_link == "https://huggingface.co/datasets/someone/CPIA/blob/main/LICENSES.md"
    licence_section = hub.text.split("## License", 1)[1].split("## Citation", 1)[0]
    assert "[CPIA dataset card](https://huggingface.co/datasets/someone/CPIA)" in licence_section
    citation = hub.text.split("## Citation", 1)[1]
    assert f"author  = {{{authors}}}," in citation and all(author in citation for author in AUTHORS)
    assert "others" not in citation
    local = ModelCard.load(write_model_card(tmp_path / "local", {"model_name": "m", "dataset": str(tmp_path / "d")}))
    assert local.data.license_link == "https://github.com/zhanglab2021/CPIA_Dataset"
    assert "[CPIA dataset card](https://github.com/zhanglab2021/CPIA_Dataset)" in local.text
    other = ModelCard.load(write_model_card(tmp_path / "mit", {"model_name": "m", "license": "mit"}))
    assert other.data.license_link is None


def _bar_ends(chart: np.ndarray, colour: str) -> list[tuple[int, int]]:
    """(first row, rightmost column) of each bar drawn in `colour`, top to bottom."""
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    mask = (chart == rgb).all(axis=2)
    mask[:50] = False  # the legend's swatches
    rows = np.flatnonzero(mask.any(axis=1))
    starts = [r for k, r in enumerate(rows) if k == 0 or rows[k - 1] != r - 1]
    return [(r, int(np.flatnonzero(mask[r]).max())) for r in starts]


def test_organ_chart_bars_are_log_counts_per_organ_and_series(tmp_path: Path) -> None:
    counts = Counter({("a", "breast", "wsi", "M"): 10, ("a", "breast", "wsi", "S"): 1000, ("b", "breast", "roi", "M"): 3,
                      ("b", "breast", "roi", "S"): 7, ("c", "lung", "wsi", "M"): 100_000})
    organ_chart(counts, tmp_path / "chart.png")
    chart = np.asarray(Image.open(tmp_path / "chart.png").convert("RGB"))
    (m_breast, m_lung), (s_breast,), (roi_breast,) = (_bar_ends(chart, CHART_COLOURS[k]) for k in (2, 3, 4))
    assert _bar_ends(chart, CHART_COLOURS[0]) == _bar_ends(chart, CHART_COLOURS[1]) == []  # no XL, no L
    assert m_breast[0] < s_breast[0] < roi_breast[0] < m_lung[0]  # breast's bars, then lung's
    decade = (s_breast[1] - m_breast[1]) / 2  # 10 -> 1000
    assert decade > 40
    assert abs((m_lung[1] - s_breast[1]) - 2 * decade) <= 2  # 1000 -> 100000
    assert abs(roi_breast[1] - m_breast[1]) <= 1  # ROI M + S = 10, as many as WSI M


def test_gallery_tile_decodes_near_the_shown_scale_and_crops_tissue() -> None:
    pixels = np.full((960, 960, 3), 240, np.uint8)
    pixels[600:900, 40:340] = (150, 60, 120)  # tissue in the lower-left corner
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    encoded = Image.open(io.BytesIO(buffer.getvalue()))
    tile, crop = gallery_tile(encoded, 480)
    assert tile.size == (GALLERY_TILE, GALLERY_TILE) and crop == 480
    assert encoded.size == (480, 480)  # decoded at 1/2: its 240 px crop is within the slack of the tile
    assert (np.asarray(tile).mean(axis=2) < 200).mean() > 0.3  # the crop holds the tissue
    whole, crop = gallery_tile(Image.open(io.BytesIO(buffer.getvalue())), None)
    assert crop is None and abs(np.asarray(whole, np.float32).mean() - np.asarray(Image.fromarray(pixels).resize(
        (GALLERY_TILE, GALLERY_TILE), Image.Resampling.LANCZOS), np.float32).mean()) < 2


def test_gallery_images_are_the_rows_asked_for_across_row_groups_and_batches(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def encoded(k: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (k * 8, 255 - k * 8, 7)).save(buffer, format="PNG")
        return buffer.getvalue()

    path = tmp_path / "shard.parquet"
    table = pa.table({"image": [{"bytes": encoded(k), "path": None} for k in range(30)]})
    pq.write_table(table, path, row_group_size=12)  # rows 0-11, 12-23, 24-29
    wanted = [(1, 3), (0, 11), (0, 0), (2, 5), (0, 9), (1, 3)]  # (row group, index in it), unsorted, one twice
    rows = [{"path": path, "group": group, "index": index} for group, index in wanted]
    shown = [np.asarray(image.convert("RGB"))[0, 0, 0] for image in load_images(rows)]
    assert shown == [(12 * group + index) * 8 for group, index in wanted]


# The whole run, its forked workers included (they inherit the finder): which watched packages it looks for.
TRACED_RUN = """
import sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("matplotlib", "pandas", "tqdm"):
            with open(sys.argv[1], "a") as log:
                log.write(name + "\\n")
        return None
sys.meta_path.insert(0, Watch())
from cpia_hf.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_conversion_never_imports_matplotlib_or_pandas_nor_without_bars_tqdm(demo_build: Path, tmp_path: Path) -> None:
    sources, log, out = demo_build / "sources", tmp_path / "imports.txt", tmp_path / "dataset"
    done = subprocess.run([sys.executable, "-c", TRACED_RUN, str(log), "convert", "--catalog",
                           str(sources / "catalog.yaml"), "--source-root", str(sources), "--out", str(out),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "assets" / "organ_composition.png").is_file() and (out / "assets" / "gallery_M.jpg").is_file()
    assert not log.exists(), log.read_text()
    assert json.loads((out / "stats.json").read_text()) == json.loads((demo_build / "dataset" / "stats.json").read_text())


def test_the_card_leaves_only_the_gallery_sheets_it_shows(demo_build: Path, tmp_path: Path) -> None:
    from cpia_hf.dataset.card import write_dataset_card
    from cpia_hf.dataset.catalog import load_catalog
    from cpia_hf.dataset.mini import DEFAULT_MINI_FRACTION
    from cpia_hf.dataset.units import ConvertOptions

    out = tmp_path / "dataset"
    shutil.copytree(demo_build / "dataset", out)
    (out / "assets" / "gallery_M.png").write_bytes(b"an earlier version's sheet")
    (out / "assets" / "gallery_XXL.jpg").write_bytes(b"a scale without rows now")
    write_dataset_card(out, load_catalog(demo_build / "sources" / "catalog.yaml"), configs=("full", "mini"),
                       mini_fraction=DEFAULT_MINI_FRACTION, options=ConvertOptions())
    assert sorted(p.name for p in (out / "assets").iterdir()) == [
        "gallery_L.jpg", "gallery_M.jpg", "gallery_S.jpg", "gallery_XL.jpg", "organ_composition.png"]
    assert (out / "README.md").read_text() == (demo_build / "dataset" / "README.md").read_text()
