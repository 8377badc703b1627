"""Training images: open a source (folder, file list, parquet, saved or hub dataset) and serve square crops.

A source is list-like: a list of image paths, or a `DatasetColumn` over one column of a `datasets` dataset.
`ImageDataset` turns its items into (3, R, R) tensors in [-1, 1]; an unreadable item becomes None (logged, never
raised) and `collate_skip_bad` drops those, counting them in the batch so the main process sees the count even
when DataLoader workers did the decoding.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from codec.images import IMAGE_SUFFIXES, ImageError, list_images, load_image, read_image_list, to_rgb

logger = logging.getLogger(__name__)

# `datasets` writes these next to a save_to_disk'd Dataset / DatasetDict.
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class DataSourceError(ValueError):
    """A training data source that cannot be opened or used; the message says which and why."""


class DatasetColumn:
    """The image column of a `datasets.Dataset` as a sequence of raw items ({"bytes", "path"} dicts, bytes or paths)."""

    def __init__(self, dataset: Any, column: str, name: str) -> None:
        self.dataset, self.column, self.name = dataset, column, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(index)][self.column]

    def describe(self, index: int, item: Any) -> str:
        path = item.get("path") if isinstance(item, dict) else item if isinstance(item, str) else None
        return f"{self.name} row {index}" + (f" ({path})" if path else "")


def open_image_source(source: str | os.PathLike, split: str = "train", image_column: str = "image") -> Sequence:
    """A folder (recursive, sorted), a .txt list of paths, a parquet file/folder, a saved dataset or a hub name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            import datasets

            return _image_column(datasets.load_from_disk(str(path)), split, image_column, str(path))
        images = list_images(path)
        if images:
            return images
        if any(path.rglob("*.parquet")):
            return _parquet(path, split, image_column)
        raise DataSourceError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) or parquet files in this folder")
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return _file_list(path)
        if path.suffix.lower() == ".parquet":
            return _parquet(path, split, image_column)
        raise DataSourceError(f"{path}: expected a folder, a .txt list of images or a .parquet file")
    source = str(source)
    # Anything that reads as a path (and is not there) is a typo, not a hub dataset: say so instead of going online.
    looks_local = path.suffix.lower() in (".txt", ".parquet", *IMAGE_SUFFIXES) or source.startswith((".", "/", "~"))
    if looks_local or source.count("/") > 1 or not _HUB_NAME.fullmatch(source):
        raise DataSourceError(f"{source}: no such file or folder")
    return _hub_dataset(source, split, image_column)


def _file_list(path: Path) -> list[Path]:
    paths = read_image_list(path)
    if not paths:
        raise DataSourceError(f"{path}: the list names no images")
    return paths


def _parquet(path: Path, split: str, image_column: str) -> DatasetColumn:
    import datasets

    if path.is_file():
        # One file is one split, whatever `split` asks for: nothing in the file names the split.
        loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    else:
        # A folder may hold train-*.parquet / validation-*.parquet; datasets infers the splits from the names.
        loaded = datasets.load_dataset("parquet", data_dir=str(path))
    return _image_column(loaded, split, image_column, str(path))


def _hub_dataset(name: str, split: str, image_column: str) -> DatasetColumn:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown name, gated, missing split: all end the same way for the user
        raise DataSourceError(
            f"cannot load the dataset {name!r} (split {split!r}) from the Hugging Face hub: {type(error).__name__}: {error}. "
            "If this machine is offline, download it elsewhere and pass a local folder, parquet file or save_to_disk folder."
        ) from error
    return _image_column(loaded, split, image_column, name)


def _image_column(loaded: Any, split: str, image_column: str, name: str) -> DatasetColumn:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataSourceError(f"{name}: no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    if image_column not in loaded.column_names:
        raise DataSourceError(f"{name}: no column {image_column!r}; its columns are {loaded.column_names}")
    loaded = loaded.select_columns([image_column])  # other columns (captions...) would be read for nothing
    feature = loaded.features[image_column]
    if isinstance(feature, datasets.Image):
        # Undecoded bytes, so a corrupt row fails inside ImageDataset (skipped) rather than inside datasets (fatal).
        loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
    elif not (
        isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string")
    ):
        raise DataSourceError(f"{name}: column {image_column!r} holds {feature}, not images, image bytes or paths")
    return DatasetColumn(loaded, image_column, name)


def _decode(item: Any) -> Image.Image:
    """One raw item (path, PIL image, bytes, or datasets' {"bytes", "path"} dict) -> RGB; raises on anything bad."""
    if isinstance(item, dict):
        item = item["bytes"] if item.get("bytes") is not None else item.get("path")
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if isinstance(item, Image.Image):
        item.load()
        return to_rgb(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise ImageError("the image bytes are empty")
        with warnings.catch_warnings():
            # As load_image does: refuse decompression bombs instead of allocating gigabytes.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(item)) as image:
                image.load()
                return to_rgb(image)
    raise ImageError(f"no image in this item (a {type(item).__name__})")


class ImageDataset(torch.utils.data.Dataset):
    """Items of a source as (3, R, R) float tensors in [-1, 1]: short side resized to R, then an R x R crop.

    Random crop and flip when `train`, center crop otherwise. The randomness of item `index` (its index in the
    source, so it does not depend on `indices`) comes from a generator seeded by (seed, epoch, index): a resumed
    run calling `set_epoch` sees the same crops. An unreadable item returns None; use `collate_skip_bad`.
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
            image = _decode(item)
        except Exception as error:  # any decode failure skips the item: one bad file must not end a long run
            name = self._name(index, item)
            reason = str(error).removeprefix(f"{name}: ")  # load_image's messages already start with the path
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
