"""Benchmark images: open a source (folder, single image, .txt list, `datasets` dataset) and apply a protocol.

Protocols:
  crop256  the SD VAE model cards' protocol: short side resized to 256 (bicubic over the whole footprint), then
           the center 256x256 crop.
  full     native resolution; the codec pads and tiles as it needs to.

Each item has a stable, file-system-safe name, so every rank and every output file agrees on what it refers to.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from codec import sources
from codec.bench.output import written_by_a_benchmark
from codec.images import ImageError
from codec.sources import SourceError, decode_image

PROTOCOLS = ("crop256", "full")
CROP_SIZE = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# The shared error under this module's old name, so `except DataSourceError` catches whatever codec.sources raises.
DataSourceError = SourceError


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
        items.append(BenchItem(name, str(path), lambda path=path: decode_image(path, name=str(path))))
    return items


def _dataset_items(split: sources.DatasetSplit, column: str) -> list[BenchItem]:
    images = sources.image_column(split.dataset, column, split.name)
    width = len(str(max(len(images) - 1, 0)))
    items = []
    for i in range(len(images)):
        where = f"{split.name} row {i}"
        items.append(BenchItem(f"{i:0{width}d}", where, lambda i=i, where=where: decode_image(images[i], name=where)))
    return items


def open_source(source: str | os.PathLike, split: str = "validation", column: str = "image") -> list[BenchItem]:
    """Items of a folder (recursive, sorted), an image file, a .txt list, a .parquet file or folder, a saved dataset
    or a hub dataset name. In a folder, the images a benchmark wrote there (its -o inside the data) are left out:
    a rerun would otherwise measure an earlier run's references, reconstructions and grids as photos."""
    opened = sources.open_source(source, split=split, single_image=True)
    if isinstance(opened, sources.DatasetSplit):
        return _dataset_items(opened, column)
    paths = opened.paths
    if opened.kind == "folder":
        paths = [path for path in paths if not written_by_a_benchmark(path, opened.path)]
    # A folder's names are paths relative to it; a list's or a single image's, file names.
    return _path_items(paths, opened.path if opened.kind == "folder" else None)
