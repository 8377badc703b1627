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
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image

from codec import sources
from codec.images import ImageError
from codec.sources import SourceError, decode_image

log = logging.getLogger(__name__)

__all__ = ["DatasetSource", "FileSource", "SampleSource", "SourceError", "decode_image", "open_source"]


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
            carried["caption"] = _read_caption(path.with_suffix(".txt"))
        # The reason alone: the writer records it beside the key and describe(), which name the file already.
        return decode_image(path, max_pixels), carried

    def fingerprint(self, indices: range) -> str:
        """Names, sizes and modification times: an edited, replaced or deleted file (or caption, when captions
        are carried) makes its shard stale."""
        digest = hashlib.sha256()
        for index in indices:
            path = self.paths[index]
            files = [path, path.with_suffix(".txt")] if self.carried_columns else [path]
            digest.update(f"{self.keys[index]}\0{_stat_record(files)}\n".encode())
        return digest.hexdigest()

    def descriptor(self) -> dict:
        return {"kind": self.kind, "path": self.name, "carried_columns": self.carried_columns}


class DatasetSource:
    """One split of a `datasets.Dataset`: the image column decoded here, the other columns carried."""

    def __init__(self, dataset: Any, name: str, split: str, image_column: str, columns: list[str] | None) -> None:
        images = sources.image_column(dataset, image_column, name)
        carried = [c for c in dataset.column_names if c != image_column] if columns is None else list(columns)
        unknown = [c for c in carried if c not in dataset.column_names or c == image_column]
        if unknown:
            raise SourceError(f"{name}: cannot carry column(s) {unknown}; its columns are {dataset.column_names}")
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
        item = self._images[index]
        # A row that points at a file names it: the row number alone would not say which file is missing or bad.
        return decode_image(item, max_pixels, name=sources.item_path(item)), carried

    def fingerprint(self, indices: range) -> str:
        # datasets fingerprints a dataset from its files and transforms: new content, new fingerprint. Rows that
        # hold a path rather than the image's bytes point outside it, so those files are checked as a folder's are.
        digest = hashlib.sha256(f"{self._fingerprint}\0{indices.start}\0{indices.stop}".encode())
        for row, path in enumerate(self._referenced_files(indices)):
            if path:  # rows with embedded bytes add nothing: caches made before this check stay valid
                digest.update(f"{row}\0{_stat_record([Path(path)])}\n".encode())
        return digest.hexdigest()

    def _referenced_files(self, indices: range) -> list[str | None]:
        """Per row, the file its image is read from, or None where the row holds the bytes themselves."""
        import pyarrow as pa

        rows = self._images.dataset.with_format("arrow")[indices.start : indices.stop]
        column = rows.column(self._images.column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            return column.to_pylist()
        if not pa.types.is_struct(column.type):
            return []  # encoded bytes
        paths = []
        for chunk in column.chunks:  # an Image column read undecoded, {"bytes", "path"}: the bytes are not copied
            embedded, where = chunk.field("bytes").is_valid().to_pylist(), chunk.field("path").to_pylist()
            paths += [None if has_bytes else path for has_bytes, path in zip(embedded, where, strict=True)]
        return paths

    def descriptor(self) -> dict:
        return {
            "kind": "dataset",
            "path": self.name,
            "split": self.split,
            "image_column": self.image_column,
            "carried_columns": self.carried_columns,
        }


def open_source(
    source: str | os.PathLike, split: str = "train", image_column: str = "image", columns: list[str] | None = None
) -> FileSource | DatasetSource:
    """A folder of images, a .txt list, a .parquet file or folder, a save_to_disk folder, or a hub dataset name."""
    opened = sources.open_source(source, split=split)
    if isinstance(opened, sources.DatasetSplit):
        # A local dataset is named by its absolute path (the manifest records it), a hub dataset by its name.
        path = Path(source).expanduser()
        name = str(path.resolve()) if path.exists() else str(source)
        return DatasetSource(opened.dataset, name, split, image_column, columns)
    name = str(opened.path.resolve())
    captions = opened.kind == "folder" and opened.captioned
    if columns is not None:  # a folder has one column to carry, its captions; a list has none
        unknown = [c for c in columns if not (captions and c == "caption")]
        if unknown:
            has = "['caption'] (from NAME.txt beside each image)" if captions else "none"
            raise SourceError(f"{name}: cannot carry column(s) {unknown}; the columns it has: {has}")
        captions = "caption" in columns
    if opened.kind == "folder":
        keys = [image.relative_to(opened.path).as_posix() for image in opened.paths]
        return FileSource(name, "folder", *_utf8_named(name, keys, opened.paths), captions)
    return FileSource(name, "list", _list_keys(opened), opened.paths, captions=False)


def _stat_record(files: list[Path]) -> str:
    parts = []
    for file in files:
        try:
            stat = file.stat()
            parts.append(f"{stat.st_size}\0{stat.st_mtime_ns}")
        except OSError:
            parts.append("missing")
    return "\0".join(parts)


def _read_caption(sidecar: Path) -> str | None:
    if not sidecar.is_file():
        return None
    try:
        return sidecar.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        # Raised as the image's reason (the item is skipped and reported): say it was the caption that failed.
        raise ImageError(f"its caption {sidecar} cannot be read: {error}") from None


def _utf8_named(name: str, keys: list[str], paths: list[Path]) -> tuple[list[str], list[Path]]:
    """Files whose names are not UTF-8 cannot be keys (Parquet's strings and the manifest's JSON are UTF-8): they
    are left out with a warning that names them, rather than ending the run when the first shard is written."""
    kept = []
    for key, path in zip(keys, paths, strict=True):
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            log.warning("%s: %r left out: its name is not UTF-8, so it cannot be a key", name, os.fsencode(key))
            continue
        kept.append((key, path))
    return [key for key, _ in kept], [path for _, path in kept]


def _list_keys(opened: sources.ImageFiles) -> list[str]:
    """A list's keys are its lines, normalised (so "./a.png" and "a.png" are one key), and must be unique."""
    keys, seen = [], {}
    for number, line in opened.lines:
        key = os.path.normpath(line)
        if key in seen:
            raise SourceError(
                f"{opened.path}: line {number} names {line!r} again (first on line {seen[key]}); keys must be unique"
            )
        seen[key] = number
        keys.append(key)
    return keys


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


# What the cache writer takes: every kind has keys, name, kind, carried_columns and the methods above.
Source = FileSource | DatasetSource | SampleSource
