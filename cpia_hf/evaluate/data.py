"""A labelled image dataset for evaluation: train / validation / test splits, taken or made, and their record.

Splits come from the dataset when it has them. Missing ones are made from its training split,
stratified by class and seeded, so that a rerun gives the same rows:

- one split only: 7:1:2 train / validation / test, as the paper splits pRCC and CAM16;
- train and test: validation is 1/8 of train (train : validation = 7 : 1);
- train and validation: that validation split becomes the test split, and validation is 1/8 of train.

`LabelledData.record()` is what `splits.json` holds: where every split came from, its size per
class, and the row indices into the dataset's own split.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from sklearn.model_selection import train_test_split

SPLITS = ("train", "validation", "test")
VALIDATION_ALIASES = ("validation", "valid", "val", "dev")
TEST_FRACTION = 0.2  # of the whole, for a dataset with one split (7:1:2)
VALIDATION_FRACTION = 0.125  # of train, so that train : validation = 7 : 1


@dataclass
class LabelledSplit:
    """Rows `indices` of the dataset's split `source_split`, with their class ids."""

    name: str
    source_split: str
    dataset: datasets.Dataset
    image_column: str
    indices: np.ndarray
    labels: np.ndarray
    made: bool

    def fingerprint(self) -> str:
        """Changes with the data files, the split and the chosen rows."""
        # `_fingerprint` is how datasets itself tracks a table's content (hash of its files or transforms).
        digest = hashlib.sha256()
        digest.update(f"{self.dataset._fingerprint}\x1f{self.source_split}\x1f{self.image_column}".encode())
        digest.update(self.indices.astype(np.int64).tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class LabelledData:
    """The three splits of a labelled dataset, its class names and how it was loaded."""

    name: str
    data: str
    config: str | None
    image_column: str
    label_column: str
    class_names: list[str]
    splits: dict[str, LabelledSplit]
    seed: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def record(self) -> dict:
        """Where each split came from, its counts per class and its row indices (the content of splits.json)."""
        return {
            "dataset": self.name,
            "data": self.data,
            "config": self.config,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "seed": self.seed,
            "classes": self.class_names,
            "splits": {
                name: {
                    "source_split": split.source_split,
                    "made": split.made,
                    "count": len(split),
                    "class_counts": {
                        class_name: int((split.labels == class_id).sum())
                        for class_id, class_name in enumerate(self.class_names)
                    },
                    "indices": split.indices.tolist(),
                }
                for name, split in self.splits.items()
            },
        }


class ImageDataset(torch.utils.data.Dataset):
    """A split as (transformed image, class id) pairs, decoding one image per item."""

    def __init__(self, split: LabelledSplit, transform: Callable):
        self.images = split.dataset.select_columns([split.image_column])
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        image = self.images[int(self.split.indices[item])][self.split.image_column]
        return self.transform(image), int(self.split.labels[item])


def load_labelled_data(
        data: str,
        config: str | None = None,
        label_column: str = "label",
        image_column: str | None = None,
        seed: int = 0,
        name: str | None = None,
) -> LabelledData:
    """Load a labelled image dataset (a folder or a Hub id) and resolve its train / validation / test splits."""
    dataset_dict = _load(data, config)
    features = next(iter(dataset_dict.values())).features
    image_column = image_column or _find_image_column(features, data)
    for column in (image_column, label_column):
        if column not in features:
            raise ValueError(f"{data}: no column {column!r}; columns are {sorted(features)}")
    if not isinstance(features[image_column], datasets.Image):
        raise ValueError(f"{data}: column {image_column!r} holds {features[image_column]!r}, not images")

    train, validation, test = _split_sources(dataset_dict, data)
    used = [split for split in dict.fromkeys((train, validation, test)) if split is not None]
    raw_labels = {split: _column_values(dataset_dict[split], label_column) for split in used}
    class_names, labels = _encode_labels(features[label_column], raw_labels, data, label_column)
    splits = _resolve_splits(dataset_dict, labels, (train, validation, test), image_column, seed, data)
    return LabelledData(
        name=name or _dataset_name(data),
        data=data,
        config=config,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        splits=splits,
        seed=seed,
    )


def _load(data: str, config: str | None) -> datasets.DatasetDict:
    path = Path(data).expanduser()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(data, config)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not loaded:
        raise ValueError(f"{data}: the dataset has no splits")
    return loaded


def _dataset_name(data: str) -> str:
    path = Path(data).expanduser()
    return path.resolve().name if path.exists() else data


def _find_image_column(features: datasets.Features, data: str) -> str:
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if "image" in image_columns:
        return "image"
    if not image_columns:
        raise ValueError(f"{data}: no image column; columns are {sorted(features)}")
    return image_columns[0]


def _column_values(dataset: datasets.Dataset, column: str) -> list:
    return dataset.select_columns([column]).with_format("arrow")[:].column(column).to_pylist()


def _encode_labels(
        feature, raw_labels: dict[str, list], data: str, label_column: str,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and class ids per split: a ClassLabel keeps its names, other values are sorted."""
    for split, values in raw_labels.items():
        missing = sum(value is None or (isinstance(feature, datasets.ClassLabel) and value < 0) for value in values)
        if missing:
            raise ValueError(f"{data}: split {split!r} has {missing} rows without a {label_column!r} label")
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), {split: np.asarray(values, dtype=np.int64) for split, values in raw_labels.items()}
    values = sorted({value for split_values in raw_labels.values() for value in split_values})
    class_id = {value: index for index, value in enumerate(values)}
    labels = {split: np.asarray([class_id[v] for v in split_values], dtype=np.int64)
              for split, split_values in raw_labels.items()}
    return [str(value) for value in values], labels


def _split_sources(dataset_dict: datasets.DatasetDict, data: str) -> tuple[str, str | None, str | None]:
    """The dataset's own splits used as train, validation and test (None: to be made from train)."""
    names = list(dataset_dict)
    if len(names) == 1:
        return names[0], None, None
    if "train" not in dataset_dict:
        raise ValueError(f"{data}: no 'train' split to evaluate with; splits are {names}")
    validation = next((name for name in VALIDATION_ALIASES if name in dataset_dict), None)
    return "train", validation, "test" if "test" in dataset_dict else None


def _resolve_splits(
        dataset_dict: datasets.DatasetDict,
        labels: dict[str, np.ndarray],
        sources: tuple[str, str | None, str | None],
        image_column: str,
        seed: int,
        data: str,
) -> dict[str, LabelledSplit]:
    train, validation, test = sources

    def taken(name: str, source: str) -> LabelledSplit:
        indices = np.arange(len(labels[source]))
        return LabelledSplit(name, source, dataset_dict[source], image_column, indices, labels[source], made=False)

    def made(name: str, source: str, indices: np.ndarray) -> LabelledSplit:
        return LabelledSplit(name, source, dataset_dict[source], image_column, indices, labels[source][indices], made=True)

    pool = np.arange(len(labels[train]))
    splits = {}
    if test is None and validation is None:
        pool, test_rows = _stratified(pool, labels[train], TEST_FRACTION, seed, data, train)
        splits["test"] = made("test", train, test_rows)
    else:
        splits["test"] = taken("test", test or validation)
    if test is not None and validation is not None:
        splits["validation"] = taken("validation", validation)
        splits["train"] = taken("train", train)
    else:
        train_rows, validation_rows = _stratified(pool, labels[train], VALIDATION_FRACTION, seed, data, train)
        splits["validation"] = made("validation", train, validation_rows)
        splits["train"] = made("train", train, train_rows)
    return {name: splits[name] for name in SPLITS}


def _stratified(
        rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int, data: str, split: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of `rows` into (kept, taken) with `fraction` taken from every class."""
    try:
        kept, taken = train_test_split(rows, test_size=fraction, stratify=labels[rows], random_state=seed)
    except ValueError as error:
        counts = np.bincount(labels[rows])
        raise ValueError(
            f"{data}: cannot split {len(rows)} rows of split {split!r} by class "
            f"(images per class: {counts.tolist()}): {error}") from error
    return np.sort(kept), np.sort(taken)
