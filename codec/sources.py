"""Image sources, shared by `codec cache`, `codec bench` and training: what a source string names, and one item decoded.

A source is a folder of images (recursive, through linked folders: see codec.scan), a .txt list of image paths,
a .parquet file or a folder of them, a `datasets` save_to_disk folder, a Hugging Face hub dataset name, or (where
the caller allows it) one image file.
`open_source` says which and opens it: `ImageFiles` for files, `DatasetSplit` for a dataset, whose image column
`image_column` checks and hands out undecoded, so that `decode_image` meets a corrupt row in the caller's hands
(to be skipped and reported) and not inside `datasets`.

`datasets` is imported inside the functions that need it: `import codec` stays light.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from codec.images import IMAGE_SUFFIXES, ImageError, read_image_list_lines, to_rgb
from codec.scan import Skipped, scan_folder

log = logging.getLogger(__name__)

# `datasets` writes one of these into a save_to_disk'd Dataset / DatasetDict folder.
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_PATH_SUFFIXES = (".txt", ".parquet", *IMAGE_SUFFIXES)
_REPORTED_SKIPS = 20  # named one by one; past that, a count (a folder of broken links need not flood the log)


class SourceError(ValueError):
    """A source that cannot be opened or used; the message names it and says why."""


@dataclass(frozen=True)
class ImageFiles:
    """Image files: a folder's (recursive, sorted), a .txt list's (in its order) or one image's."""

    kind: str  # "folder", "list" or "image"
    path: Path  # the folder, list or image, as given
    paths: list[Path]
    # A list's (line number, line as written) for each path, for keys and for messages that point at a line.
    lines: list[tuple[int, str]] = field(default_factory=list)
    captioned: bool = False  # a folder with a NAME.txt beside at least one NAME.jpg
    skipped: list[Skipped] = field(default_factory=list)  # a folder's dangling links, link loops, unreadable folders


@dataclass(frozen=True)
class DatasetSplit:
    """One split of a `datasets` dataset (every column), and the name messages give it."""

    dataset: Any
    name: str


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


def open_source(source: str | os.PathLike, *, split: str, single_image: bool = False) -> ImageFiles | DatasetSplit:
    """A folder of images, a .txt list, a .parquet file or folder, a save_to_disk folder, a hub dataset name, or
    (with `single_image`) one image file. `split` picks a split where the dataset has several; a single .parquet
    file is one split, whatever `split` asks for."""
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            import datasets

            return _split(datasets.load_from_disk(str(path)), split, str(path))
        scan = scan_folder(path, (*IMAGE_SUFFIXES, ".txt", ".parquet"))  # one walk: it may hold millions of files
        report_skipped(path, scan.skipped)
        images = [file for file in scan.files if file.suffix.lower() in IMAGE_SUFFIXES]
        if images:
            texts = {file for file in scan.files if file.suffix.lower() == ".txt"}
            captioned = any(image.with_suffix(".txt") in texts for image in images)
            return ImageFiles("folder", path, images, captioned=captioned, skipped=scan.skipped)
        if any(file.suffix.lower() == ".parquet" for file in scan.files):
            return _parquet(path, split)
        raise SourceError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) or parquet files in this folder")
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".txt":
            return _file_list(path)
        if suffix == ".parquet":
            return _parquet(path, split)
        if single_image and suffix in IMAGE_SUFFIXES:
            return ImageFiles("image", path, [path])
        image = "an image, " if single_image else ""
        raise SourceError(f"{path}: expected a folder, {image}a .txt list of images, a .parquet file or a dataset")
    text = str(source)
    # Anything that reads as a path (and is not there) is a typo, not a hub dataset: say so instead of going online.
    if text.startswith((".", "/", "~")) or suffix in _PATH_SUFFIXES or not _HUB_NAME.fullmatch(text):
        raise SourceError(f"{text}: no such file or folder")
    return _hub(text, split)


def report_skipped(folder: Path, skipped: list[Skipped]) -> None:
    """Warn of what a folder's scan left out, each with its reason."""
    for entry in skipped[:_REPORTED_SKIPS]:
        log.warning("%s: skipped, %s", entry.path, entry.reason)
    if len(skipped) > _REPORTED_SKIPS:
        log.warning(
            "%s: %d more entries skipped (links and folders that cannot be read)",
            folder,
            len(skipped) - _REPORTED_SKIPS,
        )


def _file_list(path: Path) -> ImageFiles:
    entries = read_image_list_lines(path)
    if not entries:
        raise SourceError(f"{path}: the list names no images")
    return ImageFiles("list", path, [image for _, _, image in entries], [(n, line) for n, line, _ in entries])


def _parquet(path: Path, split: str) -> DatasetSplit:
    import datasets

    if path.is_file():
        # One file is one split, whatever `split` asks for: nothing in the file names the split.
        loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    else:
        # A folder may hold train-*.parquet / validation-*.parquet; datasets infers the splits from the names.
        loaded = datasets.load_dataset("parquet", data_dir=str(path))
    return _split(loaded, split, str(path))


def _hub(name: str, split: str) -> DatasetSplit:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown name, gated, missing split: all end the same way for the user
        raise SourceError(
            f"cannot load the dataset {name!r} (split {split!r}) from the Hugging Face hub: {type(error).__name__}: "
            f"{error}. If this machine is offline, download it elsewhere and pass a local folder, a .txt list, a "
            "parquet file or a save_to_disk folder."
        ) from error
    return _split(loaded, split, name)


def _split(loaded: Any, split: str, name: str) -> DatasetSplit:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SourceError(f"{name}: no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    return DatasetSplit(loaded, name)


def image_column(dataset: Any, column: str, name: str) -> DatasetColumn:
    """`dataset`'s image column alone, undecoded: images, image bytes or paths; any other column is refused."""
    import datasets

    if column not in dataset.column_names:
        raise SourceError(f"{name}: no column {column!r}; its columns are {dataset.column_names}")
    images = dataset.select_columns([column])  # other columns (captions...) would be read for nothing
    feature = images.features[column]
    if isinstance(feature, datasets.Image):
        # Undecoded bytes, so a corrupt row fails in decode_image (skipped, reported) rather than inside datasets.
        images = images.cast_column(column, datasets.Image(decode=False))
    elif not (
        isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string")
    ):
        raise SourceError(f"{name}: column {column!r} holds {feature}, not images, image bytes or paths")
    return DatasetColumn(images, column, name)


def item_path(item: Any) -> str | None:
    """The file an item is read from: a path, or a {"bytes": None, "path"} dict; None for bytes and PIL images."""
    if isinstance(item, dict):
        return item.get("path") if item.get("bytes") is None else None
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


def decode_image(item: Any, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """One item (a path, encoded bytes, datasets' {"bytes", "path"} dict, or a PIL image) -> RGB, with EXIF
    orientation, alpha over white, 16-bit and CMYK handled by to_rgb.

    Anything wrong raises ImageError with the reason alone, or "NAME: reason" given `name` (a caller that records
    the name beside the reason leaves it out). `max_pixels` refuses larger images from the header, before their
    pixels are allocated; without it, PIL's own decompression-bomb limit applies.
    """
    try:
        return _decode(item, max_pixels)
    except ImageError as error:
        if name is None:
            raise
        raise ImageError(f"{name}: {error}") from None


def _decode(item: Any, max_pixels: int | None) -> Image.Image:
    if isinstance(item, dict):  # an Image column read with decode=False
        item = item["bytes"] if item.get("bytes") is not None else item.get("path")
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise ImageError("the image bytes are empty")
        stream: Any = io.BytesIO(item)
    elif isinstance(item, (str, os.PathLike)):
        try:
            size = os.stat(item).st_size
        except FileNotFoundError:
            raise ImageError("no such file") from None
        except OSError as error:
            raise ImageError(f"cannot read the file ({error.strerror or error})") from None
        if size == 0:
            raise ImageError("the file is empty")
        stream = item
    elif not isinstance(item, Image.Image):
        raise ImageError(f"no image in this item (a {type(item).__name__})")
    try:
        with warnings.catch_warnings():
            # PIL only warns below twice its limit: make that an error too, instead of allocating gigabytes.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(item, Image.Image):
                return _load(item, max_pixels)  # the caller's image: not closed here
            with Image.open(stream) as image:
                return _load(image, max_pixels)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image file (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"too many pixels, refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot decode the image, perhaps truncated or corrupt ({error})") from None


def _load(image: Image.Image, max_pixels: int | None) -> Image.Image:
    # The header gives the size: refuse a huge image before decoding allocates its pixels.
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageError(
            f"too many pixels ({image.width}x{image.height} > {max_pixels}), refused as a possible decompression bomb"
        )
    image.load()  # decode now, so a truncated file fails here with its reason, not later inside a batch
    return to_rgb(image)
