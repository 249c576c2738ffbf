"""Pre-training images from a CPIA dataset folder or Hub id: loading, filters, sharding, decoding.

Images are decoded and augmented inside DataLoader workers. Each image's augmentation is seeded by
(run seed, epoch, image id), so a run's views do not depend on the worker count or on where a
resumed run starts reading.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from ..model.workers import loader_workers
from ..standard import SCALES, stable_unit_float

KEPT_COLUMNS = ("image", "image_id")
SHUFFLE_BUFFER = 10_000


def load_pretrain_rows(
    data: str,
    config: str,
    *,
    scales: Sequence[str] = (),
    organs: Sequence[str] = (),
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Dataset | IterableDataset:
    """Rows of split "train" of `config`, restricted to `scales` / `organs` when given."""
    unknown = sorted(set(scales) - set(SCALES))
    if unknown:
        raise ValueError(f"unknown scale(s) {unknown}; choose from {list(SCALES)}")
    try:
        rows = load_dataset(data, config, split="train", streaming=streaming, cache_dir=cache_dir)
    except Exception as error:  # datasets raises many types; name the source and keep the cause
        raise ValueError(f"{data}: cannot load config {config!r} ({type(error).__name__}: {error})") from error
    columns = rows.column_names or []
    if "image" not in columns:
        raise ValueError(f"{data} [{config}]: no 'image' column (columns: {columns})")
    for column, wanted in (("scale", scales), ("organ", organs)):
        if wanted and column not in columns:
            raise ValueError(f"{data} [{config}]: cannot filter on {column!r}, the column is missing")
    if scales or organs:
        scale_set, organ_set = set(scales), set(organs)

        def keep(scale: str, organ: str) -> bool:
            return (not scale_set or scale in scale_set) and (not organ_set or organ in organ_set)

        rows = rows.filter(keep, input_columns=["scale", "organ"])
    return rows.select_columns([c for c in KEPT_COLUMNS if c in columns])


def derive_seed(stream: Literal["augment", "step"], *position: Any) -> int:
    """A 62-bit seed of one random stream at one position of a run: `("augment", seed, epoch, image)`
    seeds an image's views, `("step", seed, step, process)` a step's masks and drop-path."""
    return int(stable_unit_float(stream, *position) * 2**62)


def make_views(row: dict, key: Any, transform: Callable, seed: int, epoch: int) -> Any:
    """Decode one row's image and augment it under its own seed (the caller's RNG is untouched)."""
    name = row.get("image_id", key)
    try:
        image = row["image"].convert("RGB")
    except Exception as error:  # PIL raises several types for corrupt or truncated data
        raise ValueError(f"image {name!r}: cannot decode ({error})") from error
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("augment", seed, epoch, name))
        return transform(image)


class _EpochViews:
    """Rows, their view transform, and the (seed, epoch) that seeds each image's augmentation."""

    def __init__(self, rows: Dataset | IterableDataset, transform: Callable, seed: int):
        self.rows = rows
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class PretrainImages(_EpochViews, torch.utils.data.Dataset):
    """Map-style views of a `datasets.Dataset` (accelerate shards it across processes)."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return make_views(self.rows[index], index, self.transform, self.seed, self.epoch)


class StreamingPretrainImages(_EpochViews, torch.utils.data.IterableDataset):
    """Views of a streaming `datasets.IterableDataset` already split for this process.

    Iterated inside a DataLoader worker, the underlying dataset hands each worker its own shards.
    """

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.rows.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        for index, row in enumerate(self.rows):
            yield make_views(row, index, self.transform, self.seed, self.epoch)


def build_loader(
    rows: Dataset | IterableDataset,
    transform: Callable,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    process_index: int = 0,
    num_processes: int = 1,
) -> DataLoader:
    """DataLoader of augmented views; full batches only (contrastive losses and BN want equal batches).

    A map-style loader is returned unsharded for `accelerator.prepare` to shard; a streaming one is
    split here with `split_dataset_by_node`, since accelerate would make every process read all of it.
    """
    common = dict(batch_size=batch_size, drop_last=True, pin_memory=torch.cuda.is_available(),
                  **loader_workers(num_workers))
    if isinstance(rows, IterableDataset):
        rows = rows.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        rows = split_dataset_by_node(rows, rank=process_index, world_size=num_processes)
        return DataLoader(StreamingPretrainImages(rows, transform, seed), **common)
    if len(rows) < batch_size * num_processes:
        raise ValueError(
            f"{len(rows)} images are fewer than one global batch ({batch_size} x {num_processes} processes)"
        )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(PretrainImages(rows, transform, seed), shuffle=True, generator=generator, **common)
