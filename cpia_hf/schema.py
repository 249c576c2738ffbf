"""Row schema of every CPIA Parquet shard: typed columns for `datasets` and the Hub viewer.

`COLUMN_TYPES` is the one definition. `FEATURES` (the `datasets` Features) is built from it on first use;
the conversion writes shards without importing `datasets` (which takes longer to import than a small
slide takes to pack), through `ARROW_SCHEMA`, `COLUMN_OPTIONS` and `open_shard_writer`, which give the
bytes `datasets`' ParquetWriter gives (checked in tests/test_schema.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import pyarrow.parquet as pq
    from datasets import Features

# column -> `datasets` type: "image" (an Image feature) or a Value dtype
COLUMN_TYPES = {
    "image": "image",
    "image_id": "string",
    "subset": "string",
    "kind": "string",
    "scale": "string",
    "organ": "string",
    "disease": "string",
    "stain": "string",
    "field": "string",
    "source_file": "string",
    "x": "float64",
    "y": "float64",
    "width": "float64",
    "height": "float64",
    "mpp": "float64",
    "tissue_fraction": "float32",
    "label": "string",
    "license": "string",
}
COLUMNS = tuple(COLUMN_TYPES)
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how `datasets` stores an Image
# `datasets`' default content-defined chunking of Parquet pages (config.DEFAULT_CDC_OPTIONS)
CDC_OPTIONS = {"min_chunk_size": 256 * 1024, "max_chunk_size": 1024 * 1024, "norm_level": 0}


def _feature_dicts() -> dict[str, dict]:
    """`Features.to_dict()` of the columns, as `datasets` stores it in the `huggingface` schema metadata."""
    return {name: {"_type": "Image"} if kind == "image" else {"dtype": kind, "_type": "Value"}
            for name, kind in COLUMN_TYPES.items()}


ARROW_SCHEMA = pa.schema(
    [pa.field(name, IMAGE_TYPE if kind == "image" else pa.type_for_alias(kind)) for name, kind in COLUMN_TYPES.items()],
    metadata={"huggingface": json.dumps({"info": {"features": _feature_dicts()}})},
)
# The card's `dataset_info.features` (Features._to_yaml_list)
FEATURES_YAML = [{"name": name, "dtype": kind} for name, kind in COLUMN_TYPES.items()]
# Parquet options of the image column's leaves (PLAIN, uncompressed: JPEG bytes neither compress nor repeat) and of
# the others (dictionary, snappy), as `datasets.arrow_writer.get_parquet_column_options` gives them
_IMAGE_LEAVES = [f"{name}.{leaf.name}" for name, kind in COLUMN_TYPES.items() if kind == "image" for leaf in IMAGE_TYPE]
_OTHER_COLUMNS = [name for name, kind in COLUMN_TYPES.items() if kind != "image"]
COLUMN_OPTIONS = {
    "compression": {**{leaf: "none" for leaf in _IMAGE_LEAVES}, **{name: "snappy" for name in _OTHER_COLUMNS}},
    "use_dictionary": _OTHER_COLUMNS,
    "column_encoding": {leaf: "PLAIN" for leaf in _IMAGE_LEAVES},
}


def open_shard_writer(path: Path) -> "pq.ParquetWriter":
    """A Parquet writer of published shards: write tables with `write_shard_table`, then close()."""
    import pyarrow.parquet as pq

    writer = pq.ParquetWriter(str(path), ARROW_SCHEMA, use_content_defined_chunking=CDC_OPTIONS, write_page_index=True,
                              compression=dict(COLUMN_OPTIONS["compression"]),
                              use_dictionary=list(COLUMN_OPTIONS["use_dictionary"]),
                              column_encoding=dict(COLUMN_OPTIONS["column_encoding"]))
    writer.add_key_value_metadata({"content_defined_chunking": json.dumps(CDC_OPTIONS)})
    return writer


def write_shard_table(writer: "pq.ParquetWriter", table: pa.Table, row_group_size: int) -> None:
    """Write `table` (shard columns) as `datasets`' ParquetWriter does (which first makes the columns contiguous:
    the bytes are the same without that copy)."""
    writer.write_table(table.cast(ARROW_SCHEMA), row_group_size)


def read_columns(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file's table (all columns, or `columns`). Read through ParquetFile: `pq.read_table` goes through
    pyarrow's dataset layer, whose import loads pandas, which a conversion never needs."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read(columns=columns)


class _NoPandas:
    """A meta path finder under which `import pandas` fails."""

    def find_spec(self, name: str, path=None, target=None) -> None:
        if name.partition(".")[0] == "pandas":
            raise ImportError("pandas is not used by a conversion")
        return None


def arrow_without_pandas() -> None:
    """Make `import pandas` fail in this process and the workers it forks, so that pyarrow treats pandas as absent:
    it imports pandas on building its first array only to recognise pandas inputs, which a conversion never has.
    For processes that only convert (the `cpia convert` command); a no-op once pandas is loaded."""
    if "pandas" not in sys.modules and not any(isinstance(finder, _NoPandas) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())


def __getattr__(name: str) -> "Features":
    if name == "FEATURES":  # built on first use: importing `datasets` is needed only to load or check
        from datasets import Features, Image, Value

        features = Features({column: Image() if kind == "image" else Value(kind) for column, kind in COLUMN_TYPES.items()})
        globals()["FEATURES"] = features
        return features
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
