"""Helpers for the tests of sharded sources: WebDataset tars and Parquet shards made in the test, rows read back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from cache_testing import smooth_image
from PIL import Image

import codec
from codec.cache.by_input import build_by_input
from codec.cache.identity import model_identities
from codec.cache.locations import filesystem
from codec.cache.preprocess import Preprocessing
from codec.cache.shard_sources import open_shard_source
from codec.cache.writer import CacheModel, Settings


def image_bytes(seed: int, height: int = 32, width: int = 40, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(seed, height, width)).save(buffer, fmt)
    return buffer.getvalue()


def tar_bytes(first: int, count: int, *, uncaptioned: tuple[int, ...] = (), broken: tuple[int, ...] = ()) -> bytes:
    """img2dataset's layout: KEY.jpg (or .png), KEY.txt and KEY.json for keys first .. first + count - 1."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index in range(first, first + count):
            key = f"{index:09d}"
            members = [(f"{key}.jpg", b"not an image" if index in broken else image_bytes(index, fmt="JPEG"))]
            if index not in uncaptioned:
                members.append((f"{key}.txt", f"photo number {index}".encode()))
            members.append((f"{key}.json", json.dumps({"key": key, "width": 40}).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tars(folder: Path, shards: range, per_shard: int = 3, **options) -> list[Path]:
    """Tars NNNNN.tar for each shard number, `per_shard` images each, keys numbered across shards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in shards:
        path = folder / f"{shard:05d}.tar"
        path.write_bytes(tar_bytes(shard * per_shard, per_shard, **options))
        paths.append(path)
    return paths


def parquet_bytes(first: int, count: int, *, missing: tuple[int, ...] = ()) -> bytes:
    """A Parquet shard as datasets' Image feature writes it: image {bytes, path}, plus key and caption columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [
        None if i in missing else {"bytes": image_bytes(i), "path": f"{i:05d}.png"} for i in range(first, first + count)
    ]
    table = pa.table(
        {
            "key": [f"k{i:05d}" for i in range(first, first + count)],
            "image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "caption": [f"row {i}" for i in range(first, first + count)],
            "score": [float(i) / 10 for i in range(first, first + count)],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2)
    return buffer.getvalue()


def read_cache_rows(fs, root: str) -> list[dict]:
    """Every row of a cache, parts in the manifest's order, through any fsspec filesystem."""
    import pyarrow.parquet as pq

    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    rows = []
    for entry in manifest["shards"]:
        with fs.open(f"{root}/{entry['file']}", "rb") as stream:
            rows += pq.read_table(stream).to_pylist()
    return rows


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def build(source: str, out, model_dir: Path, **options):
    """build_by_input with a freshly loaded model; options go to Preprocessing, the source, Settings or the run."""
    prep = Preprocessing(options.pop("resolution", 32), flip=options.pop("flip", False))
    run = {k: options.pop(k) for k in ("on_part_written", "group") if k in options}
    opened = open_shard_source(
        str(source), **{k: options.pop(k) for k in ("columns", "image_column", "streaming") if k in options}
    )
    settings = Settings(prep, **{"batch_size": 2, "shard_size": 2, "progress": False, **options})
    vae = codec.AutoencoderKL.load(model_dir)
    return build_by_input(opened, str(out), CacheModel(vae, model_identities(vae), str(model_dir)), settings, **run)


def rows(out) -> list[dict]:
    """Every row of a cache at a path or URL."""
    fs, root = filesystem(str(out))
    return read_cache_rows(fs, root)
