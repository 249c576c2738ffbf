"""Row schema of every CPIA Parquet shard, as `datasets` Features (typed columns for the Hub viewer)."""
from __future__ import annotations

from datasets import Features, Image, Value

FEATURES = Features(
    {
        "image": Image(),
        "image_id": Value("string"),
        "subset": Value("string"),
        "kind": Value("string"),
        "scale": Value("string"),
        "organ": Value("string"),
        "disease": Value("string"),
        "stain": Value("string"),
        "field": Value("string"),
        "source_file": Value("string"),
        "x": Value("float64"),
        "y": Value("float64"),
        "width": Value("float64"),
        "height": Value("float64"),
        "mpp": Value("float64"),
        "tissue_fraction": Value("float32"),
        "label": Value("string"),
        "license": Value("string"),
    }
)
COLUMNS = tuple(FEATURES)
