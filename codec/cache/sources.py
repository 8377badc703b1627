"""What `codec cache` reads: an image folder (recursive), a .txt list of images, or a `datasets` dataset.

Every source has sorted, unique string keys: a folder's are paths relative to it, a list's are its lines
(normalised), a dataset's are zero-padded row numbers (so string order is row order). Shards are planned on
the keys, so every process and every resumed run agrees on them. A dataset's other columns (captions...) are
carried into the cache; a folder carries `caption` from `NAME.txt` beside `NAME.jpg` when any such file exists.

Items are decoded in DataLoader workers; anything wrong with one (corrupt, empty, not an image, too many pixels)
raises ImageError with the reason, and the item is skipped and reported, never fatal.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from codec.images import IMAGE_SUFFIXES, ImageError, to_rgb

# `datasets` writes one of these into a save_to_disk'd Dataset / DatasetDict folder.
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class SourceError(ValueError):
    """A source that cannot be opened; the message names it and says why."""


def decode_image(data: str | os.PathLike | bytes, max_pixels: int) -> Image.Image:
    """A path or encoded bytes -> RGB (EXIF orientation, alpha over white, 16-bit, CMYK handled by to_rgb)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageError("the image bytes are empty")
        stream: Any = io.BytesIO(data)
    else:
        if os.stat(data).st_size == 0:
            raise ImageError("the file is empty")
        stream = data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                # The header gives the size: refuse a huge image before decoding allocates its pixels.
                if image.width * image.height > max_pixels:
                    raise ImageError(
                        f"too many pixels ({image.width}x{image.height} > {max_pixels}), refused as a possible "
                        "decompression bomb"
                    )
                image.load()  # decode now, so a truncated file fails here with its reason
                return to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image file (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"too many pixels, refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot decode the image, perhaps truncated or corrupt ({error})") from None


class FileSource:
    """Image files: a folder (keys relative to it) or a .txt list (keys as listed)."""

    def __init__(self, name: str, kind: str, keys: list[str], paths: list[Path], captions: bool) -> None:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self.name, self.kind = name, kind
        self.keys = [keys[i] for i in order]
        self.paths = [paths[i] for i in order]
        self.carried_columns = ["caption"] if captions else []

    def carried_schema(self):
        import pyarrow as pa

        return pa.schema([pa.field(name, pa.string()) for name in self.carried_columns])

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def load(self, index: int, max_pixels: int) -> tuple[Image.Image, dict]:
        path = self.paths[index]
        carried = {}
        if self.carried_columns:
            sidecar = path.with_suffix(".txt")
            carried["caption"] = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        try:
            return decode_image(path, max_pixels), carried
        except FileNotFoundError:
            raise ImageError("no such file") from None

    def fingerprint(self, indices: range) -> str:
        """Names, sizes and modification times: an edited, replaced or deleted file makes its shard stale."""
        digest = hashlib.sha256()
        for index in indices:
            try:
                stat = self.paths[index].stat()
                digest.update(f"{self.keys[index]}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{self.keys[index]}\0missing\n".encode())
        return digest.hexdigest()

    def descriptor(self) -> dict:
        return {"kind": self.kind, "path": self.name, "carried_columns": self.carried_columns}


class DatasetSource:
    """One split of a `datasets.Dataset`: the image column decoded here, the other columns carried."""

    def __init__(self, dataset: Any, name: str, split: str, image_column: str, columns: list[str] | None) -> None:
        import datasets

        if image_column not in dataset.column_names:
            raise SourceError(f"{name}: no column {image_column!r}; its columns are {dataset.column_names}")
        carried = [c for c in dataset.column_names if c != image_column] if columns is None else list(columns)
        unknown = [c for c in carried if c not in dataset.column_names or c == image_column]
        if unknown:
            raise SourceError(f"{name}: cannot carry column(s) {unknown}; its columns are {dataset.column_names}")
        images = dataset.select_columns([image_column])
        feature = images.features[image_column]
        if isinstance(feature, datasets.Image):
            # Undecoded bytes, so a corrupt row fails here (skipped and reported) rather than inside datasets.
            images = images.cast_column(image_column, datasets.Image(decode=False))
        elif not (
            isinstance(feature, datasets.Value)
            and feature.dtype in ("binary", "large_binary", "string", "large_string")
        ):
            raise SourceError(f"{name}: column {image_column!r} holds {feature}, not images, image bytes or paths")
        self.name, self.kind, self.split, self.image_column = name, "dataset", split, image_column
        self.carried_columns = carried
        self._images = images
        # Arrow-formatted rows are the stored values (no decoding), so they match the column's arrow type.
        self._carried = dataset.select_columns(carried).with_format("arrow") if carried else None
        self._fingerprint = getattr(dataset, "_fingerprint", None) or f"rows={len(dataset)}"
        width = max(9, len(str(len(dataset))))
        self.keys = [f"{i:0{width}d}" for i in range(len(dataset))]

    def carried_schema(self):
        import pyarrow as pa

        if self._carried is None:
            return pa.schema([])
        return self._carried.features.arrow_schema

    def describe(self, index: int) -> str:
        return f"{self.name} row {index}"

    def load(self, index: int, max_pixels: int) -> tuple[Image.Image, dict]:
        carried = self._carried[index].to_pylist()[0] if self._carried is not None else {}
        item = self._images[index][self.image_column]
        if isinstance(item, dict):  # datasets' {"bytes", "path"}
            item = item["bytes"] if item.get("bytes") is not None else item.get("path")
        if item is None:
            raise ImageError("the row has no image")
        if isinstance(item, str) and not os.path.isfile(item):
            raise ImageError(f"no such file {item}")
        return decode_image(item, max_pixels), carried

    def fingerprint(self, indices: range) -> str:
        # datasets fingerprints a dataset from its files and transforms: new content, new fingerprint.
        return hashlib.sha256(f"{self._fingerprint}\0{indices.start}\0{indices.stop}".encode()).hexdigest()

    def descriptor(self) -> dict:
        return {
            "kind": "dataset",
            "path": self.name,
            "split": self.split,
            "image_column": self.image_column,
            "carried_columns": self.carried_columns,
        }


def _folder(path: Path) -> FileSource | None:
    images, sidecars = [], set()
    for file in path.rglob("*"):
        suffix = file.suffix.lower()
        if suffix in IMAGE_SUFFIXES and file.is_file():
            images.append(file)
        elif suffix == ".txt":
            sidecars.add(file.with_suffix(""))
    if not images:
        return None
    captions = any(image.with_suffix("") in sidecars for image in images)
    keys = [image.relative_to(path).as_posix() for image in images]
    return FileSource(str(path.resolve()), "folder", keys, images, captions)


def _file_list(path: Path) -> FileSource:
    keys, paths, seen = [], [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key = os.path.normpath(line)
        if key in seen:
            raise SourceError(
                f"{path}: line {number} names {line!r} again (first on line {seen[key]}); keys must be unique"
            )
        seen[key] = number
        keys.append(key)
        paths.append(Path(os.path.normpath(path.parent / Path(line).expanduser())))  # relative to the list
    if not keys:
        raise SourceError(f"{path}: the list names no images")
    return FileSource(str(path.resolve()), "list", keys, paths, captions=False)


def open_source(
    source: str | os.PathLike, split: str = "train", image_column: str = "image", columns: list[str] | None = None
) -> FileSource | DatasetSource:
    """A folder of images, a .txt list, a .parquet file or folder, a save_to_disk folder, or a hub dataset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            import datasets

            return _dataset(datasets.load_from_disk(str(path)), str(path.resolve()), split, image_column, columns)
        folder = _folder(path)  # one walk of the tree: it may hold millions of files
        if folder is not None:
            return folder
        if any(path.rglob("*.parquet")):
            return _parquet(path, split, image_column, columns)
        raise SourceError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) or parquet files in this folder")
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return _file_list(path)
        if path.suffix.lower() == ".parquet":
            return _parquet(path, split, image_column, columns)
        raise SourceError(f"{path}: expected a folder, a .txt list of images, a .parquet file or a dataset")
    text = str(source)
    # Anything that reads as a path (and is not there) is a typo, not a hub dataset: say so instead of going online.
    if text.startswith((".", "/", "~")) or path.suffix.lower() in (".txt", ".parquet") or not _HUB_NAME.fullmatch(text):
        raise SourceError(f"{text}: no such file or folder")
    import datasets

    try:
        loaded = datasets.load_dataset(text, split=split)
    except Exception as error:  # offline, unknown, gated, no such split: one message for all
        raise SourceError(
            f"cannot load the dataset {text!r} (split {split!r}) from the Hugging Face hub: {type(error).__name__}: "
            f"{error}. Offline, download it elsewhere and pass a local folder, parquet file or save_to_disk folder."
        ) from error
    return _dataset(loaded, text, split, image_column, columns)


def _parquet(path: Path, split: str, image_column: str, columns: list[str] | None) -> DatasetSource:
    import datasets

    if path.is_file():
        loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")  # one file, one split
    else:
        loaded = datasets.load_dataset("parquet", data_dir=str(path))
    return _dataset(loaded, str(path.resolve()), split, image_column, columns)


def _dataset(loaded: Any, name: str, split: str, image_column: str, columns: list[str] | None) -> DatasetSource:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SourceError(f"{name}: no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    return DatasetSource(loaded, name, split, image_column, columns)


class SampleSource:
    """`count` evenly spaced items of a source, without carried columns: for statistics over a large dataset."""

    def __init__(self, source: FileSource | DatasetSource, count: int) -> None:
        total = len(source.keys)
        count = min(count, total)
        self._base, self._indices = source, sorted({i * total // count for i in range(count)})
        self.name, self.kind, self.carried_columns = source.name, source.kind, []
        self.keys = [source.keys[i] for i in self._indices]

    def carried_schema(self):
        import pyarrow as pa

        return pa.schema([])

    def describe(self, index: int) -> str:
        return self._base.describe(self._indices[index])

    def load(self, index: int, max_pixels: int) -> tuple[Image.Image, dict]:
        return self._base.load(self._indices[index], max_pixels)[0], {}

    def fingerprint(self, indices: range) -> str:
        return self._base.fingerprint(range(self._indices[indices.start], self._indices[indices.stop - 1] + 1))

    def descriptor(self) -> dict:
        return {**self._base.descriptor(), "carried_columns": [], "sample": len(self.keys)}
