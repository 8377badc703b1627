"""Training images: open a source (folder, file list, parquet, saved or hub dataset) and serve square crops.

A source is list-like: a list of image paths, or a `DatasetColumn` over one column of a `datasets` dataset.
`ImageDataset` turns its items into (3, R, R) tensors in [-1, 1]; an unreadable item becomes None (logged, never
raised). The trainer wraps the dataset in `IndexedImages` and batches with `collate_indexed`, which drops those and
counts them in the batch, so the main process sees the count even when DataLoader workers did the decoding;
`collate_skip_bad` does the same for an `ImageDataset` used on its own. `build_data` makes a run's training and validation sets, and
`images_in_full_steps` how many training images an epoch uses so that every optimizer step is whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from codec import sources
from codec.sources import DatasetColumn, SourceError, decode_image
from training.config import ConfigError, RunConfig, TrainConfig

__all__ = [
    "DataSourceError",
    "DatasetColumn",
    "ImageDataset",
    "IndexedImages",
    "build_data",
    "collate_indexed",
    "collate_skip_bad",
    "images_in_full_steps",
    "open_image_source",
    "split_train_validation",
]

logger = logging.getLogger(__name__)

# The shared error under this module's old name, so `except DataSourceError` catches whatever codec.sources raises.
DataSourceError = SourceError


def open_image_source(source: str | os.PathLike, split: str = "train", image_column: str = "image") -> Sequence:
    """A folder (recursive, sorted), a .txt list of paths, a parquet file/folder, a saved dataset or a hub name:
    a list of image paths, or a DatasetColumn of the dataset's undecoded image column."""
    opened = sources.open_source(source, split=split)
    if isinstance(opened, sources.DatasetSplit):
        return sources.image_column(opened.dataset, image_column, opened.name)
    return opened.paths


class ImageDataset(torch.utils.data.Dataset):
    """Items of a source as (3, R, R) float tensors in [-1, 1]: short side resized to R, then an R x R crop.

    Random crop and flip when `train`, center crop otherwise. The randomness of item `index` (its index in the
    source, so it does not depend on `indices`) comes from a generator seeded by (seed, epoch, index): a resumed
    run calling `set_epoch` sees the same crops. An unreadable item returns None (see `collate_skip_bad`).
    """

    def __init__(
        self,
        source: Sequence,
        resolution: int,
        *,
        train: bool = True,
        flip: bool = True,
        seed: int = 0,
        indices: Sequence[int] | None = None,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.source, self.resolution, self.train, self.flip, self.seed = source, int(resolution), train, flip, seed
        self.indices = list(indices) if indices is not None else None
        # In shared memory so DataLoader workers, including persistent ones started in an earlier epoch, see set_epoch.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # (index, name, reason) of the items that failed *in this process*; with workers, count via the batches.
        self.bad_items: list[tuple[int, str, str]] = []

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.source)

    def __getitem__(self, position: int) -> torch.Tensor | None:
        index = self.indices[position] if self.indices is not None else int(position)
        item = None
        try:
            item = self.source[index]
            image = decode_image(item)  # the reason alone: the item is named below
        except Exception as error:  # any decode failure skips the item: one bad file must not end a long run
            name, reason = self._name(index, item), str(error)
            self.bad_items.append((index, name, reason))
            logger.warning("skipping unreadable image %s (item %d): %s", name, index, reason)
            return None
        return self._crop(image, np.random.default_rng((self.seed, self.epoch, index)))

    def _name(self, index: int, item: Any) -> str:
        describe = getattr(self.source, "describe", None)
        if describe is not None:
            return describe(index, item)
        return str(item) if isinstance(item, (str, os.PathLike)) else f"item {index}"

    def _crop(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        size = self.resolution
        width, height = image.size
        scale = size / min(width, height)
        # The crop offset is chosen on the resized image's pixel grid (as if resizing first, then cropping), but
        # only the crop is resampled: a 6000x4000 photo costs an R x R resize, and a very long one cannot blow up.
        scaled_w, scaled_h = max(size, round(width * scale)), max(size, round(height * scale))
        # Always draw x, y, flip in this order, so turning flip on or off leaves the crops where they were.
        x, y = int(rng.integers(scaled_w - size + 1)), int(rng.integers(scaled_h - size + 1))
        mirror = rng.random() < 0.5
        if not self.train:
            x, y, mirror = (scaled_w - size) // 2, (scaled_h - size) // 2, False
        box = (x / scale, y / scale, min(width, (x + size) / scale), min(height, (y + size) / scale))
        crop = image.resize((size, size), Image.Resampling.BICUBIC, box=box)  # PIL filters over the whole footprint
        if mirror and self.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(crop, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def collate_skip_bad(batch: list[torch.Tensor | None]) -> dict[str, Any]:
    """DataLoader collate_fn: {"pixels": (B, 3, R, R) or None when every item was bad, "skipped": count of bad}."""
    good = [item for item in batch if item is not None]
    return {"pixels": torch.stack(good) if good else None, "skipped": len(batch) - len(good)}


def split_train_validation(n_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic disjoint (train, validation) index lists covering range(n_items), each sorted.

    A positive fraction holds out at least one item, and at least one item is always left to train on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    if n_items < 0:
        raise ValueError(f"n_items must be non-negative, got {n_items}")
    n_val = min(max(round(n_items * fraction), 1 if fraction > 0 else 0), max(n_items - 1, 0))
    order = np.random.default_rng(seed).permutation(n_items)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


class IndexedImages(torch.utils.data.Dataset):
    """An ImageDataset whose items carry their index, so each image's posterior noise depends on it alone."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int):
        return position, self.images[position]


def collate_indexed(batch):
    good = [(index, pixels) for index, pixels in batch if pixels is not None]
    return {
        "indices": torch.tensor([index for index, _ in good], dtype=torch.int64),
        "pixels": torch.stack([pixels for _, pixels in good]) if good else None,
        "skipped": len(batch) - len(good),
    }


def build_data(config: TrainConfig) -> tuple[ImageDataset, ImageDataset]:
    data, seed = config.data, config.run.seed
    source = open_image_source(data.train, split=data.split, image_column=data.image_column)
    if data.validation:
        split = data.validation_split or ("validation" if data.validation == data.train else data.split)
        val_source = open_image_source(data.validation, split=split, image_column=data.image_column)
        train_indices, val_indices = None, list(range(min(len(val_source), data.validation_images)))
    elif data.validation_fraction > 0:
        val_source = source
        train_indices, val_indices = split_train_validation(len(source), data.validation_fraction, seed)
        val_indices = val_indices[: data.validation_images]
    else:
        # No held-out images: validate on center crops of the first training images and say so.
        logger.warning("no validation data configured: validating on training images (center crops)")
        val_source, train_indices = source, None
        val_indices = list(range(min(len(source), data.validation_images)))
    train = ImageDataset(source, data.resolution, train=True, flip=data.random_flip, seed=seed, indices=train_indices)
    val = ImageDataset(val_source, data.resolution, train=False, flip=False, seed=seed, indices=val_indices)
    return train, val


def images_in_full_steps(run: RunConfig, images: int, processes: int) -> int:
    """How many training images an epoch uses: whole optimizer steps of batch x accumulation x processes."""
    per_step = run.batch_size * run.gradient_accumulation_steps * processes
    if images < per_step:
        raise ConfigError(
            f"data.train: {images} training images make no full step of {per_step} (run.batch_size "
            f"{run.batch_size} x gradient_accumulation_steps {run.gradient_accumulation_steps} x {processes} "
            "processes); lower run.batch_size or add images"
        )
    return images // per_step * per_step
