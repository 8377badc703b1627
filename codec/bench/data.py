"""Benchmark images: open a source (folder, single image, .txt list, `datasets` dataset) and apply a protocol.

Protocols:
  crop256  the SD VAE model cards' protocol: short side resized to 256 (bicubic over the whole footprint), then
           the center 256x256 crop.
  full     native resolution; the codec pads and tiles as it needs to.

Each item has a stable, file-system-safe name, so every rank and every output file agrees on what it refers to.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from codec.images import IMAGE_SUFFIXES, ImageError, list_images, load_image, read_image_list, to_rgb

PROTOCOLS = ("crop256", "full")
CROP_SIZE = 256
_DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what `datasets` writes beside a save_to_disk'd dataset
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class DataSourceError(ValueError):
    """A benchmark data source that cannot be opened; the message names the source and the reason."""


@dataclass(frozen=True)
class BenchItem:
    """One benchmark image: a unique name, where it came from (for messages) and how to load it."""

    name: str
    source: str
    loader: Callable[[], Image.Image]

    def load(self, protocol: str) -> np.ndarray:
        """The reference image under `protocol` as an (H, W, 3) uint8 array; ImageError names the source."""
        try:
            image = self.loader()
        except ImageError:
            raise
        except Exception as error:  # datasets rows fail in many ways; the user needs to know which row
            raise ImageError(f"{self.source}: cannot load the image ({type(error).__name__}: {error})") from error
        return apply_protocol(image, protocol)


def apply_protocol(image: Image.Image, protocol: str) -> np.ndarray:
    if protocol == "full":
        return np.asarray(image, dtype=np.uint8).copy()
    if protocol != "crop256":
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    size = CROP_SIZE
    width, height = image.size
    scale = size / min(width, height)
    scaled_w, scaled_h = max(size, round(width * scale)), max(size, round(height * scale))
    x, y = (scaled_w - size) // 2, (scaled_h - size) // 2
    # Resample only the crop's footprint (as training's center crop does): a huge photo costs a 256x256 resize.
    box = (x / scale, y / scale, min(width, (x + size) / scale), min(height, (y + size) / scale))
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8).copy()


def _safe_name(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "image"


def _path_items(paths: list[Path], root: Path | None) -> list[BenchItem]:
    items, seen = [], set()
    for path in paths:
        relative = path.relative_to(root) if root is not None and path.is_relative_to(root) else Path(path.name)
        name = base = _safe_name(str(relative.with_suffix("")).replace(os.sep, "__"))
        counter = 1
        while name in seen:  # a.png and a.jpg in one folder, or the same stem from two list entries
            counter += 1
            name = f"{base}_{counter}"
        seen.add(name)
        items.append(BenchItem(name, str(path), lambda path=path: load_image(path)))
    return items


def _file_list(path: Path) -> list[Path]:
    paths = read_image_list(path)
    if not paths:
        raise DataSourceError(f"{path}: the list names no images")
    return paths


def _decode_item(value: Any) -> Image.Image:
    """A `datasets` image cell (PIL image, {"bytes", "path"} dict, bytes or a path) -> RGB."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, Image.Image):
        value.load()
        return to_rgb(value)
    if isinstance(value, (str, os.PathLike)):
        return load_image(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(value)) as image:
                image.load()
                return to_rgb(image)
    raise ImageError(f"no image in this cell (a {type(value).__name__})")


def _dataset_items(dataset: Any, name: str, split: str, column: str) -> list[BenchItem]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataSourceError(f"{name}: no split {split!r}; it has {sorted(dataset)}")
        dataset = dataset[split]
    if column not in dataset.column_names:
        raise DataSourceError(f"{name}: no column {column!r}; its columns are {dataset.column_names}")
    dataset = dataset.select_columns([column])
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))  # decode per item, errors per row
    width = len(str(max(len(dataset) - 1, 0)))
    return [
        BenchItem(f"{index:0{width}d}", f"{name} row {index}", lambda i=index: _decode_item(dataset[i][column]))
        for index in range(len(dataset))
    ]


def open_source(source: str | os.PathLike, split: str = "validation", column: str = "image") -> list[BenchItem]:
    """Items of a folder (recursive, sorted), an image file, a .txt list, a saved dataset or a hub dataset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASET_MARKERS):
            import datasets

            return _dataset_items(datasets.load_from_disk(str(path)), str(path), split, column)
        images = list_images(path)
        if not images:
            raise DataSourceError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return _path_items(images, path)
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return _path_items(_file_list(path), None)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return _path_items([path], None)
        raise DataSourceError(f"{path}: expected a folder, an image, a .txt list of images or a saved dataset")
    text = str(source)
    if path.suffix.lower() in (".txt", *IMAGE_SUFFIXES) or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise DataSourceError(f"{text}: no such file or folder")
    import datasets

    try:
        dataset = datasets.load_dataset(text, split=split)
    except Exception as error:  # offline, unknown, gated or missing split: one message for the user
        raise DataSourceError(
            f"cannot load the dataset {text!r} (split {split!r}): {type(error).__name__}: {error}. "
            "Offline, pass a local folder, a .txt list or a save_to_disk folder instead."
        ) from error
    return _dataset_items(dataset, text, split, column)
