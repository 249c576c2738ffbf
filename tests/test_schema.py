"""The shard schema written without `datasets` is the one `datasets` writes, and a conversion never imports it."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml
from datasets import config
from datasets.arrow_writer import ParquetWriter, get_parquet_column_options
from PIL import Image

from cpia_hf import schema

REPO = Path(__file__).resolve().parents[1]


def test_schema_options_and_card_features_are_those_of_datasets() -> None:
    features = schema.FEATURES
    assert schema.ARROW_SCHEMA.equals(features.arrow_schema, check_metadata=True)
    assert schema.COLUMN_OPTIONS == get_parquet_column_options(features, features.arrow_schema)
    assert schema.CDC_OPTIONS == config.DEFAULT_CDC_OPTIONS
    assert schema.FEATURES_YAML == features._to_yaml_list()
    assert schema.COLUMNS == tuple(features)


def shard_table(rows: int, seed: int) -> pa.Table:
    """Rows of the shard schema with real JPEG bytes (noise, so that pages split by content) and varied metadata."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(rows):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (384, 384, 3), np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append({"bytes": buffer.getvalue(), "path": None})
    columns = {"image": images}
    for name, kind in schema.COLUMN_TYPES.items():
        if kind == "string":
            columns[name] = [f"{name}-{rng.integers(0, 5)}" for _ in range(rows)]
        elif kind.startswith("float"):
            columns[name] = rng.random(rows).tolist()
    columns["label"] = [None] * rows
    return pa.Table.from_pydict(columns, schema=schema.ARROW_SCHEMA.remove_metadata())


def test_shard_writer_gives_the_bytes_of_datasets_parquet_writer(tmp_path: Path) -> None:
    # two row groups, the first from a table of two chunks (as packing concatenates pending tables)
    groups = [pa.concat_tables([shard_table(5, 0), shard_table(7, 1)]), shard_table(6, 2)]
    reference = ParquetWriter(path=str(tmp_path / "datasets.parquet"), features=schema.FEATURES)
    for table in groups:
        reference.write_table(table, writer_batch_size=table.num_rows)
    reference.finalize()
    ours = schema.open_shard_writer(tmp_path / "ours.parquet")
    for table in groups:
        schema.write_shard_table(ours, table, table.num_rows)
    ours.close()
    expected = (tmp_path / "datasets.parquet").read_bytes()
    assert len(expected) > 2 * 1024 * 1024  # several content-defined chunks (256 KiB to 1 MiB) of image pages
    assert (tmp_path / "ours.parquet").read_bytes() == expected


def test_the_dataset_commands_import_no_heavy_package() -> None:
    code = ("import sys, cpia_hf.cli; cpia_hf.cli.build_parser('convert'); cpia_hf.cli.build_parser('push'); "
            "import cpia_hf.dataset.convert, cpia_hf.dataset.card, cpia_hf.dataset.slide.tiles; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'datasets', 'pandas', 'matplotlib', 'torch', 'huggingface_hub', 'dask', 'distributed', 'sklearn'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# The whole run, its forked workers included (they inherit the blocker), with `datasets` and `pandas` unimportable.
BLOCKED_RUN = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "pandas", "torch"):
            raise ImportError(f"{name} imported during a conversion")
sys.meta_path.insert(0, Blocker())
from cpia_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_conversion_never_imports_datasets_or_pandas(tmp_path: Path, real_slide: Path) -> None:
    sources = tmp_path / "sources"
    (sources / "wsi").mkdir(parents=True)
    (sources / "wsi" / real_slide.name).symlink_to(real_slide)
    (sources / "catalog.yaml").write_text(yaml.safe_dump({"version": 1, "entries": [{
        "name": "real", "kind": "wsi", "path": "wsi", "pattern": "*.svs", "organ": "breast", "disease": "unknown",
        "stain": "H&E", "field": "histopathology", "license": "unknown", "homepage": "unknown",
        "citation": "unknown"}]}))
    out = tmp_path / "dataset"
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "convert", "--catalog", str(sources / "catalog.yaml"),
                           "--source-root", str(sources), "--out", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported during a conversion" not in done.stderr + done.stdout
    shards = sorted(out.glob("data/full/*/*/*.parquet"))
    assert shards and (out / "README.md").is_file()
    assert pa.parquet.read_schema(shards[0]).equals(schema.ARROW_SCHEMA, check_metadata=True)
