"""Sources read as input shards: WebDataset tars, Parquet files with image bytes, `datasets` in streaming mode.

    'shards/{00000..00999}.tar'   img2dataset's layout: KEY.jpg / .png / .webp, KEY.txt (carried as `caption`),
                                  KEY.json (carried as `json`, its text as written)
    'data/part-*.parquet'         an `image` column: a {bytes, path} struct (datasets' Image feature, img2dataset),
                                  image bytes, or a path; every other column carried (a `key` column names rows)
    --streaming NAME              a hub dataset (or any `load_dataset` name) streamed, one unit per data file

A unit of work is one input shard, read front to back as a stream (tar members in order, Parquet row groups), so
nothing is listed per image: planning costs one listing of the shards. An item's key is the input's name, a
slash, and its key within the input (the tar member's stem, the `key` column, or the zero-padded row number):
unique across shards, and stable when other shards come and go. Paths may be fsspec URLs (codec.cache.locations).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from codec.cache.locations import filesystem, fingerprint
from codec.cache.patterns import Input, list_inputs
from codec.images import IMAGE_SUFFIXES
from codec.sources import SourceError

TAR_COLUMNS = ("caption", "json")
_IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
_BATCH_ROWS = 256  # Parquet rows converted to Python at a time: bounded memory whatever the row group size


class InputError(SourceError):
    """An input shard that cannot be read (truncated tar, another Parquet schema): the message names it."""


@dataclass
class Sample:
    """One item of an input shard: its key, its encoded image (or None, with the reason), its carried columns."""

    key: str
    image: bytes | None
    carried: dict = field(default_factory=dict)
    problem: str = ""


@dataclass
class ShardSource:
    """Input shards of one kind; picklable and light (no open filesystem), so every process can take one."""

    kind: str  # "tar", "parquet" or "streaming"
    name: str  # as given: a pattern, a folder, a URL or a dataset name
    root: str
    inputs: list[Input]
    carried_columns: list[str]
    image_column: str = "image"
    carried_types: dict[str, Any] = field(default_factory=dict)  # Parquet: each carried column's Arrow type
    has_key_column: bool = False
    split: str = "train"

    def carried_schema(self):
        import pyarrow as pa

        return pa.schema([pa.field(c, self.carried_types.get(c, pa.string())) for c in self.carried_columns])

    def descriptor(self) -> dict:
        described = {"kind": self.kind, "path": self.name, "carried_columns": self.carried_columns}
        if self.kind != "tar":
            described["image_column"] = self.image_column
        if self.kind == "streaming":
            described["split"] = self.split
        return described

    def describe(self, item: Input) -> str:
        if self.kind == "streaming":
            return f"{self.name} ({item.name})"
        return item.path if "://" not in self.name else f"{self.name.split('://', 1)[0]}://{item.path}"

    def samples(self, item: Input, start: int = 0) -> Iterator[Sample]:
        """The input's items from position `start` on, in the input's own order."""
        if self.kind == "streaming":
            yield from _streaming_samples(self, item, start)
            return
        fs, _ = filesystem(self.name)
        try:
            with fs.open(item.path, "rb") as stream:
                if self.kind == "tar":
                    yield from _skip(_tar_samples(stream, item.name), start)
                else:
                    yield from _parquet_samples(self, fs, stream, item, start)
        except (SourceError, FileNotFoundError):
            raise
        except Exception as error:  # a truncated tar or Parquet file, a dropped connection: name the input
            raise InputError(f"{self.describe(item)}: cannot be read ({type(error).__name__}: {error})") from None


def _skip(samples: Iterator[Sample], start: int) -> Iterator[Sample]:
    for position, sample in enumerate(samples):
        if position >= start:
            yield sample


def _tar_samples(stream, input_name: str) -> Iterator[Sample]:
    """WebDataset grouping: consecutive members sharing a key (the name up to its first dot) are one sample."""
    import tarfile

    current, fields, seen = None, {}, set()
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            folder, _, filename = member.name.rpartition("/")
            if not member.isfile() or filename.startswith(".") or "." not in filename:
                continue
            stem, _, extension = filename.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            if key != current:
                if current is not None:
                    yield _tar_sample(input_name, current, fields, seen)
                current, fields = key, {}
            fields[extension.lower()] = tar.extractfile(member).read()
    if current is not None:
        yield _tar_sample(input_name, current, fields, seen)


def _tar_sample(input_name: str, key: str, fields: dict[str, bytes], seen: set[str]) -> Sample:
    sample = Sample(f"{input_name}/{key}", None)
    if key in seen:
        sample.problem = "its key appears twice in this shard (members of one sample must be adjacent)"
        sample.key += f"#{len(seen)}"  # kept apart from the first, which is cached
        return sample
    seen.add(key)
    image = next((fields[e] for e in _IMAGE_EXTENSIONS if e in fields), None)
    if image is None:
        sample.problem = f"no image in this sample (it has {', '.join(sorted(fields)) or 'nothing'})"
        return sample
    sample.image = image
    try:
        caption = fields.get("txt")
        sample.carried["caption"] = caption.decode("utf-8").strip() if caption is not None else None
        metadata = fields.get("json")
        sample.carried["json"] = metadata.decode("utf-8") if metadata is not None else None
    except UnicodeDecodeError as error:
        sample.image, sample.problem = None, f"its .txt or .json is not UTF-8 ({error})"
    return sample


def _parquet_samples(source: ShardSource, fs, stream, item: Input, start: int) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(stream)
    schema = parquet.schema_arrow
    _check_columns(source, schema, item)
    columns = [source.image_column, *source.carried_columns, *(["key"] if source.has_key_column else [])]
    width = max(9, len(str(parquet.metadata.num_rows)))
    row, groups = 0, []
    for index in range(parquet.metadata.num_row_groups):  # whole row groups before `start` are not read at all
        rows = parquet.metadata.row_group(index).num_rows
        if row + rows > start:
            groups.append(index)
        else:
            row += rows
    if not groups:
        return
    folder = item.path.rsplit("/", 1)[0]
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=columns):
        values = {name: batch.column(name).to_pylist() for name in columns}
        for offset in range(len(batch)):
            if row + offset >= start:
                name = values["key"][offset] if source.has_key_column else f"{row + offset:0{width}d}"
                carried = {c: values[c][offset] for c in source.carried_columns}
                yield _parquet_sample(fs, folder, f"{item.name}/{name}", values[source.image_column][offset], carried)
        row += len(batch)


def _check_columns(source: ShardSource, schema, item: Input) -> None:
    wanted = {source.image_column: None, **source.carried_types}
    for name, kind in wanted.items():
        index = schema.get_field_index(name)
        if index < 0:
            raise InputError(f"{source.describe(item)}: no column {name!r}, which the first shard has")
        if kind is not None and schema.field(index).type != kind:
            raise InputError(
                f"{source.describe(item)}: column {name!r} is {schema.field(index).type}, but {kind} in the first shard"
            )


def _parquet_sample(fs, folder: str, key: str, value: Any, carried: dict) -> Sample:
    """An image cell: a {bytes, path} struct, bytes, or a path (relative to the Parquet file's folder)."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Sample(key, bytes(value), carried)
    if isinstance(value, str) and value:
        path = value if value.startswith("/") or "://" in value else f"{folder}/{value}"
        try:
            return Sample(key, fs.cat_file(path), carried)
        except OSError as error:
            return Sample(key, None, carried, f"cannot read {value} ({error.strerror or error})")
    return Sample(key, None, carried, "no image in this row")


def _streaming_dataset(source: ShardSource):
    """The streamed dataset, resolved once per process and plan (its data files may be a hub request away)."""
    return _streamed(source.name, source.split, source.image_column, tuple(i.fingerprint for i in source.inputs))


@functools.lru_cache(maxsize=4)
def _streamed(name: str, split: str, image_column: str, plan: tuple):
    return _load_streamed(name, split, image_column)


def _load_streamed(name: str, split: str, image_column: str):
    import datasets

    loaded = datasets.load_dataset(name, split=split, streaming=True)
    features = loaded.features or {}
    if isinstance(features.get(image_column), datasets.Image):
        loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
    return loaded


def _streaming_samples(source: ShardSource, item: Input, start: int) -> Iterator[Sample]:
    index = int(item.path)
    shard = _streaming_dataset(source).shard(num_shards=len(source.inputs), index=index, contiguous=True)
    for row, example in enumerate(shard):
        if row < start:
            continue
        carried = {c: example.get(c) for c in source.carried_columns}
        value = example.get(source.image_column)
        if isinstance(value, dict):
            value = value.get("bytes")
        key = f"{item.name}/{row:09d}"
        yield Sample(key, value, carried) if isinstance(value, bytes) else Sample(key, None, carried, "no image bytes")


def _streaming_inputs(name: str, split: str, image_column: str, columns: list[str] | None) -> ShardSource:
    """A streamed dataset's units: its data files where `datasets` says which they are, else its shards."""
    try:
        loaded = _load_streamed(name, split, image_column)
    except Exception as error:  # offline, unknown name, missing split: all end the same way for the user
        raise SourceError(
            f"cannot stream the dataset {name!r} (split {split!r}): {type(error).__name__}: {error}"
        ) from None
    count = loaded.num_shards
    inputs = []
    for index in range(count):
        files = getattr(loaded.shard(num_shards=count, index=index)._ex_iterable, "kwargs", {}).get("files") or []
        label = os.path.basename(str(files[0])) if len(files) == 1 else f"shard-{index:05d}-of-{count:05d}"
        inputs.append(Input(label, str(index), 0, _files_fingerprint(files) or f"{name}:{split}:{index}/{count}"))
    features = loaded.features or {}
    if image_column not in features:
        raise SourceError(f"{name}: no column {image_column!r}; its columns are {sorted(features)}")
    carried = [c for c in features if c != image_column] if columns is None else list(columns)
    unknown = [c for c in carried if c not in features or c == image_column]
    if unknown:
        raise SourceError(f"{name}: cannot carry column(s) {unknown}; its columns are {sorted(features)}")
    return ShardSource(
        "streaming", name, "", inputs, carried, image_column, _arrow_types(features, carried), split=split
    )


def _arrow_types(features, carried: list[str]) -> dict:
    import datasets

    schema = datasets.Features({c: features[c] for c in carried}).arrow_schema
    return {c: schema.field(c).type for c in carried}


def _files_fingerprint(files: list) -> str | None:
    """The data files' own fingerprints (size and ETag or mtime), where their filesystem answers."""
    parts = []
    for file in files:
        try:
            fs, path = filesystem(str(file).split("::")[-1])
            parts.append(f"{os.path.basename(str(file))}:{fingerprint(fs.info(path))}")
        except Exception:  # a path this process cannot stat (an opaque builder argument): no fingerprint
            return None
    return ";".join(parts) or None


def _parquet_columns(source: str, first: Input, image_column: str, columns: list[str] | None) -> tuple:
    import pyarrow.parquet as pq

    fs, _ = filesystem(source)
    with fs.open(first.path, "rb") as stream:
        schema = pq.ParquetFile(stream).schema_arrow
    names = schema.names
    if image_column not in names:
        raise SourceError(f"{first.path}: no column {image_column!r}; its columns are {names} (use --image-column)")
    has_key = "key" in names and image_column != "key"
    carried = [n for n in names if n not in (image_column, "key")] if columns is None else list(columns)
    unknown = [c for c in carried if c not in names or c in (image_column, "key")]
    if unknown:
        raise SourceError(f"{first.path}: cannot carry column(s) {unknown}; its columns are {names}")
    return carried, {c: schema.field(c).type for c in carried}, has_key


def open_shard_source(
    source: str,
    *,
    image_column: str = "image",
    columns: list[str] | None = None,
    streaming: bool = False,
    split: str = "train",
) -> ShardSource:
    """Input shards named by a brace pattern, a glob, a folder, one file (any of them an fsspec URL), or with
    `streaming` a `datasets` name streamed."""
    if streaming:
        return _streaming_inputs(source, split, image_column, columns)
    kind, root, inputs = list_inputs(source)
    if kind == "tar":
        carried = list(TAR_COLUMNS) if columns is None else list(columns)
        unknown = [c for c in carried if c not in TAR_COLUMNS]
        if unknown:
            raise SourceError(f"{source}: cannot carry column(s) {unknown}; tar shards carry {list(TAR_COLUMNS)}")
        return ShardSource("tar", source, root, inputs, carried)
    carried, types, has_key = _parquet_columns(source, inputs[0], image_column, columns)
    return ShardSource("parquet", source, root, inputs, carried, image_column, types, has_key)
