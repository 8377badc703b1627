"""The on-disk format of a latent cache: Parquet shards that `datasets` loads directly, and a manifest.

    OUT/manifest.json           codec identity, scaling, preprocessing, source, counts, shards, tool version
    OUT/data/shard-00000.parquet one row per image, in key order
    OUT/skipped.jsonl           one line per unreadable image: key, source, reason

Row columns: `key`; `mean` and `logvar` of the posterior (raw, unscaled; flattened, in the cache's latent dtype:
list<float16> or list<float32>, or for bf16, which Parquet lacks, its raw bytes); `shape` (C, h, w); with
--flip, `flip_mean` and `flip_logvar` of the mirrored image; `bucket` (H, W); `original_size` (H, W);
`crop_top_left` (top, left) in the resized image, as SDXL conditions on; `crop_box` (left, top, right, bottom)
in the original; then the source's carried columns. logvar, not std: std underflows in fp16 where logvar does not.

Each shard's Parquet footer holds its own record (`latent_codec` metadata): the compatibility hash, the source
fingerprint of its keys, and its skipped images. A shard file exists only complete (written to a temporary file,
then renamed), so "its footer matches the plan" is exactly "this shard is done": resume needs no other state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from codec.atomic import atomic_path

FORMAT = "latent-codec-cache"
FORMAT_VERSION = 1
DATA_DIR = "data"
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
META_KEY = b"latent_codec"
LATENT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The shard's own columns, and the names the reader gives an item (a carried column must not replace them).
RESERVED_COLUMNS = (
    "key", "mean", "logvar", "shape", "flip_mean", "flip_logvar", "bucket", "original_size", "crop_top_left", "crop_box",
    "latents", "flipped",
)  # fmt: skip


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp)` to a temporary file, then rename (atomic_path gives it the mode of an ordinary
    new file, not mkstemp's 0600: a cache is read by other users' training jobs)."""
    with atomic_path(path) as tmp:
        write(tmp)


class CacheError(ValueError):
    """A cache that is unreadable, incomplete, or made with another codec or preprocessing than asked."""


def shard_path(out: Path, index: int) -> Path:
    return Path(out) / DATA_DIR / f"shard-{index:05d}.parquet"


@dataclass
class Row:
    key: str
    mean: torch.Tensor  # (C, h, w), raw posterior
    logvar: torch.Tensor
    bucket: tuple[int, int]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    crop_box: tuple[float, float, float, float]
    carried: dict = field(default_factory=dict)
    flip_mean: torch.Tensor | None = None
    flip_logvar: torch.Tensor | None = None


def compat_record(
    identity: str, preprocessing: dict, latent_dtype: str, encode_dtype: str, shard_size: int, source: dict
) -> dict:
    """What two runs must agree on to write into one cache. The source's path is left out: a moved folder is the
    same source, and changed files are caught per shard by the fingerprints."""
    return {
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "preprocessing": preprocessing,
        "latent_dtype": latent_dtype,
        "encode_dtype": encode_dtype,
        "shard_size": shard_size,
        "source": {key: value for key, value in source.items() if key != "path"},
    }


def compat_hash(record: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# Preprocessing settings that mean nothing without buckets (caches written before they were normalised recorded
# whatever was given, so a rerun must not call that another preprocessing).
BUCKET_ONLY = ("bucket_list", "bucket_step", "max_aspect")


def _differences(found: dict, wanted: dict) -> list[str]:
    names = {"identity": "model (codec identity)", "source": "source kind or columns"}
    lines = []
    for key, value in wanted.items():
        old = found.get(key)
        if old == value:
            continue
        if isinstance(value, dict) and isinstance(old, dict):  # name the setting, not the whole section
            unbucketed = key == "preprocessing" and not (old.get("buckets") or value.get("buckets"))
            ignored = BUCKET_ONLY if unbucketed else ("bucket_list",)
            differing = [
                f"{key} {sub}: cache has {old.get(sub)!r}, this run has {value.get(sub)!r}"
                for sub in sorted(set(old) | set(value))
                if sub not in ignored and old.get(sub) != value.get(sub)
            ]
            lines += differing or ([] if unbucketed else [f"{key}: differs"])
        else:
            lines.append(f"{names.get(key, key)}: cache has {old!r}, this run has {value!r}")
    return lines


def check_compatible(found: dict, wanted: dict, where: str | os.PathLike) -> None:
    """Refuse to mix: name each setting in which `found` (an existing cache) differs from this run."""
    differences = _differences(found, wanted)
    if differences:
        raise CacheError(
            f"{where} was made with different settings; refusing to mix them in one cache. "
            + "; ".join(differences)
            + ". Write to a new output folder (or delete this one)."
        )


def _list_column(arrays: list[np.ndarray], value_type):
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    values = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _latent_column(tensors: list[torch.Tensor], latent_dtype: str):
    import pyarrow as pa

    dtype = LATENT_DTYPES[latent_dtype]
    tensors = [t.detach().to("cpu", dtype).contiguous() for t in tensors]
    if dtype == torch.bfloat16:  # no bf16 in numpy or Parquet: its raw little-endian bytes
        return pa.array([t.view(torch.int16).numpy().tobytes() for t in tensors], type=pa.binary())
    return _list_column([t.numpy() for t in tensors], pa.float16() if dtype == torch.float16 else pa.float32())


def schema(latent_dtype: str, flip: bool, carried):
    """The Arrow schema of every shard of one cache (identical across shards, so `datasets` reads them as one)."""
    import pyarrow as pa

    latent = (
        pa.binary() if latent_dtype == "bf16" else pa.list_(pa.float16() if latent_dtype == "fp16" else pa.float32())
    )
    fields = [pa.field("key", pa.string()), pa.field("mean", latent), pa.field("logvar", latent)]
    fields.append(pa.field("shape", pa.list_(pa.int32())))
    if flip:
        fields += [pa.field("flip_mean", latent), pa.field("flip_logvar", latent)]
    fields += [pa.field(name, pa.list_(pa.int32())) for name in ("bucket", "original_size", "crop_top_left")]
    fields.append(pa.field("crop_box", pa.list_(pa.float32())))
    return pa.schema(fields + list(carried))


def rows_to_table(rows: list[Row], latent_dtype: str, flip: bool, carried):
    import pyarrow as pa

    target = schema(latent_dtype, flip, carried)
    columns = {
        "key": pa.array([r.key for r in rows], type=pa.string()),
        "mean": _latent_column([r.mean for r in rows], latent_dtype),
        "logvar": _latent_column([r.logvar for r in rows], latent_dtype),
        "shape": _list_column([np.asarray(r.mean.shape, dtype=np.int32) for r in rows], pa.int32()),
    }
    if flip:
        columns["flip_mean"] = _latent_column([r.flip_mean for r in rows], latent_dtype)
        columns["flip_logvar"] = _latent_column([r.flip_logvar for r in rows], latent_dtype)
    for name in ("bucket", "original_size", "crop_top_left"):
        columns[name] = _list_column([np.asarray(getattr(r, name), dtype=np.int32) for r in rows], pa.int32())
    columns["crop_box"] = _list_column([np.asarray(r.crop_box, dtype=np.float32) for r in rows], pa.float32())
    for carried_field in carried:
        values = [r.carried.get(carried_field.name) for r in rows]
        columns[carried_field.name] = pa.array(values, type=carried_field.type)
    return pa.table([columns[f.name] for f in target], schema=target)


def write_shard(out: Path, index: int, table, meta: dict, path: Path | None = None) -> Path:
    """Write one shard atomically (to `path`, by default shard `index`'s by position), its record in the footer."""
    import pyarrow.parquet as pq

    path = shard_path(out, index) if path is None else path
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    rows = row_group_rows(table)
    # Latents are noise to a dictionary or to min/max statistics: computing them would only cost time.
    atomic_write(
        path,
        lambda tmp: pq.write_table(table, tmp, row_group_size=rows, use_dictionary=False, write_statistics=["key"]),
    )
    return path


ROW_GROUP_BYTES = 32 << 20  # a reader holds whole row groups: this bounds its memory whatever the shard size


def row_group_rows(table) -> int:
    """Rows per Parquet row group so that each holds about ROW_GROUP_BYTES."""
    per_row = table.nbytes / max(1, table.num_rows)
    return max(1, int(ROW_GROUP_BYTES // max(1.0, per_row)))


def read_shard_meta(path: Path) -> dict | None:
    """A shard's footer record, or None when the file is missing or not a finished shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        meta = json.loads(metadata[META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    # A footer of another shape (edited by hand, or another tool's under our key) is no shard of ours either.
    return meta if isinstance(meta, dict) and isinstance(meta.get("record", {}), dict) else None


def fixed_width_rows(column, width: int, dtype) -> np.ndarray:
    """A list<int> / list<float> column of fixed-length rows (shape, bucket, ...) -> a (rows, width) array."""
    return np.asarray(column.combine_chunks().flatten(), dtype=dtype).reshape(-1, width)


def latent_arrays(column) -> tuple[np.ndarray, np.ndarray]:
    """A list<float> or binary (bf16 bytes) column, chunked or not -> (offsets, flat values), for slicing rows
    without copies."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_binary(array.type):
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
        return offsets // 2, np.frombuffer(array.buffers()[2], dtype=np.int16)
    return array.offsets.to_numpy(), array.values.to_numpy(zero_copy_only=False)


def bf16_to_float32(values: np.ndarray) -> np.ndarray:
    """bf16 stored as int16 -> float32 (bf16 is the top half of a float32)."""
    return (values.astype(np.int32) << 16).view(np.float32)
