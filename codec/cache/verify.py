"""`codec cache verify OUT`: is a cache complete, consistent, readable, and (optionally) made with this codec?

Checks: the manifest is complete and unedited; every listed shard exists, was written with the manifest's
settings, reads in full, and its row count, shapes (channels and bucket / factor) and values (finite) are right;
no unlisted shard sits in data/; keys are unique, and the rows plus the skipped images are exactly the source's
keys (by the digest the manifest recorded, so the source is not needed); skipped.jsonl lists every skipped image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from codec.cache import manifest as manifests
from codec.cache import shards
from codec.cache.identity import identity_of, same_codec

if TYPE_CHECKING:
    from codec.model import AutoencoderKL


@dataclass
class Report:
    root: Path
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    rows: int = 0
    skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard(path: Path, meta: dict, entry: dict, manifest: dict, report: Report) -> list[str]:
    """Problems with one shard go into the report; returns the keys of its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        report.problems.append(f"{path}: unreadable ({error})")
        return []
    keys = table.column("key").to_pylist()
    if not table.num_rows == meta["rows"] == entry["rows"]:
        report.problems.append(
            f"{path}: {table.num_rows} rows, but its footer says {meta['rows']} and the manifest {entry['rows']}"
        )
    if keys != sorted(set(keys)):
        report.problems.append(f"{path}: keys are not unique and sorted")
    info = manifest["codec"]
    shapes = shards.fixed_width_rows(table.column("shape"), 3, np.int64)
    buckets = shards.fixed_width_rows(table.column("bucket"), 2, np.int64)
    if len(shapes) and (
        (shapes[:, 0] != info["latent_channels"]).any() or (shapes[:, 1:] * info["downsample_factor"] != buckets).any()
    ):
        report.problems.append(
            f"{path}: latent shapes do not match {info['latent_channels']} channels at bucket / {info['downsample_factor']}"
        )
    for name in [n for n in ("mean", "logvar", "flip_mean", "flip_logvar") if n in table.column_names]:
        offsets, values = shards.latent_arrays(table.column(name))
        if (np.diff(offsets) != shapes.prod(axis=1)).any():
            report.problems.append(f"{path}: column {name!r} has rows whose length is not the product of their shape")
        if manifest["storage"]["latent_dtype"] == "bf16":
            values = shards.bf16_to_float32(values)  # bf16 is the top half of a float32
        if not np.isfinite(values).all():
            report.problems.append(f"{path}: column {name!r} holds non-finite values")
    report.rows += table.num_rows
    report.skipped += len(meta["skipped"])
    return keys


def verify_cache(root: str | Path, codec: AutoencoderKL | str | None = None) -> Report:
    """Check a cache; with `codec` (an AutoencoderKL or identity string), also that it was made with that codec."""
    root = Path(root)
    report = Report(root)
    try:
        manifest = manifests.read_manifest(root)
    except shards.CacheError as error:
        report.problems.append(str(error))
        return report
    if manifest is None:
        report.problems.append(f"{root}: no {shards.MANIFEST}; not a cache written by `codec cache`")
        return report
    if not manifest.get("complete"):
        report.problems.append(f"{root / shards.MANIFEST}: incomplete (a run was interrupted); run `codec cache` again")
        return report
    compat = manifest["compat"]
    if shards.compat_hash(manifest["compat_record"]) != compat:
        report.problems.append(f"{root / shards.MANIFEST}: its settings do not match their hash (edited by hand?)")
    if codec is not None and not same_codec(codec, manifest["codec"]["identities"].values()):
        report.problems.append(f"{root}: made with codec {manifest['codec']['identity']}, not {identity_of(codec)}")
    listed = [root / entry["file"] for entry in manifest["shards"]]
    for extra in sorted(set((root / shards.DATA_DIR).glob("*.parquet")) - set(listed)):
        report.problems.append(f"{extra}: a shard the manifest does not list (readers of data/*.parquet would see it)")
    accounted: list[str] = []
    skipped: list[str] = []
    for index, (path, entry) in enumerate(zip(listed, manifest["shards"], strict=True)):
        meta = shards.read_shard_meta(path)
        if meta is None:
            report.problems.append(f"{path}: missing, or not a finished shard")
        elif meta.get("compat") != compat or meta.get("shard") != index:
            report.problems.append(f"{path}: written with other settings than the manifest's, or as another shard")
        else:
            accounted += _check_shard(path, meta, entry, manifest, report)
            skipped += [item["key"] for item in meta["skipped"]]
        report.shards += 1
    accounted += skipped
    if len(set(accounted)) != len(accounted):
        report.problems.append(f"{root}: some keys appear in more than one shard")
    if manifests.keys_digest(sorted(accounted)) != manifest["source"]["keys_sha256"] and not report.problems:
        report.problems.append(
            f"{root}: rows and skipped images are not exactly the source's {manifest['source']['images']} keys"
        )
    counts = manifest["counts"]
    if (report.rows, report.skipped) != (counts["rows"], counts["skipped"]) and not report.problems:
        report.problems.append(f"{root}: {report.rows} rows and {report.skipped} skipped, the manifest says {counts}")
    try:
        lines = (root / shards.SKIPPED).read_text().splitlines()
        if sorted(json.loads(line)["key"] for line in lines) != sorted(skipped):
            report.problems.append(f"{root / shards.SKIPPED}: does not list exactly the skipped images")
    except (OSError, ValueError, KeyError) as error:
        report.problems.append(f"{root / shards.SKIPPED}: unreadable ({error})")
    return report
