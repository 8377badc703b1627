"""`codec cache verify OUT`: is a cache complete, consistent, readable, and (optionally) made with this codec?

Checks: the manifest is complete and unedited; every listed shard exists, was written with the manifest's
settings, reads in full, holds the content its checksum recorded when it was written, and its row count, shapes
(channels and bucket / factor) and values (finite, and within a codec's range) are right; no unlisted shard sits
in data/; keys are unique, and the rows plus the skipped images are exactly the source's keys (by the digest the
manifest recorded, so the source is not needed); skipped.jsonl lists every skipped image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from codec.cache import checksums, shards
from codec.cache import manifest as manifests
from codec.cache.identity import identity_of, same_codec
from codec.distributions import LOGVAR_RANGE

if TYPE_CHECKING:
    from codec.model import AutoencoderKL

# A codec's latent means are tens at most; a corrupted exponent makes thousands. Wide, so no real codec trips it.
MEAN_LIMIT = 1e4
NAMED_ROWS = 5  # rows a problem names by key before it counts the rest


@dataclass
class Report:
    root: Path
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    rows: int = 0
    skipped: int = 0
    unchecked: int = 0  # shards written before checksums were recorded: their content was not compared with one

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
    _check_checksum(path, table, keys, meta, entry, report)
    _check_latents(path, table, keys, manifest, report)
    report.rows += table.num_rows
    report.skipped += len(meta["skipped"])
    return keys


def _named(keys: list[str], rows) -> str:
    rows = list(rows)
    named = ", ".join(repr(keys[row]) if row < len(keys) else f"#{row}" for row in rows[:NAMED_ROWS])
    return f"row(s) {named}" + (f" and {len(rows) - NAMED_ROWS} more" if len(rows) > NAMED_ROWS else "")


def _check_checksum(path: Path, table, keys: list[str], meta: dict, entry: dict, report: Report) -> None:
    """The content against the checksum recorded when the shard was written (its footer's, and the manifest's)."""
    recorded = {value for value in (entry.get("checksum"), meta.get("checksum")) if value is not None}
    if not recorded:
        report.unchecked += 1
        return
    if len(recorded) > 1:
        report.problems.append(f"{path}: its footer and the manifest record different checksums (replaced?)")
        return
    digests = checksums.row_digests(table)
    if checksums.shard_checksum(digests) in recorded:
        return
    written = meta.get("row_checksums") or []
    changed = [
        row for row, now in enumerate(checksums.row_checksums(digests)) if row >= len(written) or now != written[row]
    ]
    where = _named(keys, changed) if changed and len(written) == len(digests) else "its rows"
    report.problems.append(
        f"{path}: {where} changed since the shard was written (checksum mismatch: corrupted on disk?)"
    )


def _check_latents(path: Path, table, keys: list[str], manifest: dict, report: Report) -> None:
    """Shapes that match the codec, and values that are finite and within a codec's range, row by row."""
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
        if len(offsets) != len(shapes) + 1 or (np.diff(offsets) != shapes.prod(axis=1)).any():
            report.problems.append(f"{path}: column {name!r} has rows whose length is not the product of their shape")
            continue
        if manifest["storage"]["latent_dtype"] == "bf16":
            values = shards.bf16_to_float32(values)  # bf16 is the top half of a float32
        low, high = LOGVAR_RANGE if "logvar" in name else (-MEAN_LIMIT, MEAN_LIMIT)
        values = values[offsets[0] : offsets[-1]].astype(np.float32, copy=False)
        with np.errstate(invalid="ignore"):
            bad = ~((values >= low) & (values <= high))  # NaN fails both comparisons
        rows = np.flatnonzero(np.logical_or.reduceat(bad, offsets[:-1] - offsets[0])) if bad.any() else []
        if len(rows):
            report.problems.append(
                f"{path}: column {name!r} holds non-finite values or values outside [{low:g}, {high:g}] in "
                f"{_named(keys, rows)}"
            )


def _listed_as(meta: dict, entry: dict, index: int) -> bool:
    """Whether a shard is the one its manifest entry names: by input and part (input shards), by its block's first
    key (blocks of keys), or by position (caches written before blocks)."""
    if "input" in entry:
        return (meta.get("input"), meta.get("part")) == (entry["input"], entry["part"])
    if "first_key" in entry:
        return meta.get("first_key") == entry["first_key"]
    return meta.get("shard") == index


def verify_cache(root: str | Path, codec: AutoencoderKL | str | None = None, progress: bool = True) -> Report:
    """Check a cache; with `codec` (an AutoencoderKL or identity string), also that it was made with that codec.
    `progress` shows a bar on stderr, where that is a terminal."""
    root = Path(root)
    report = Report(root)
    manifest = _complete_manifest(root, report)
    if manifest is None:
        return report
    if shards.compat_hash(manifest["compat_record"]) != manifest["compat"]:
        report.problems.append(f"{root / shards.MANIFEST}: its settings do not match their hash (edited by hand?)")
    if codec is not None and not same_codec(codec, manifest["codec"]["identities"].values()):
        report.problems.append(f"{root}: made with codec {manifest['codec']['identity']}, not {identity_of(codec)}")
    listed = [root / entry["file"] for entry in manifest["shards"]]
    for extra in sorted(set((root / shards.DATA_DIR).glob("*.parquet")) - set(listed)):
        report.problems.append(f"{extra}: a shard the manifest does not list (readers of data/*.parquet would see it)")
    rows, skipped = _check_shards(listed, manifest, report, progress)
    _check_accounting(root, manifest, rows + skipped, skipped, report)
    return report


def _complete_manifest(root: Path, report: Report) -> dict | None:
    try:
        manifest = manifests.read_manifest(root)
    except shards.CacheError as error:
        report.problems.append(str(error))
        return None
    if manifest is None:
        report.problems.append(f"{root}: no {shards.MANIFEST}; not a cache written by `codec cache`")
    elif not manifest.get("complete"):
        report.problems.append(f"{root / shards.MANIFEST}: incomplete (a run was interrupted); run `codec cache` again")
    else:
        return manifest
    return None


def _check_shards(listed: list[Path], manifest: dict, report: Report, progress: bool) -> tuple[list[str], list[str]]:
    """Every listed shard checked; returns the keys of their rows and of their skipped images."""
    rows: list[str] = []
    skipped: list[str] = []
    bar = tqdm(total=manifest["counts"]["rows"], desc="verify", unit="row", disable=None if progress else True)
    for index, (path, entry) in enumerate(zip(listed, manifest["shards"], strict=True)):
        meta = shards.read_shard_meta(path)
        if meta is None:
            report.problems.append(f"{path}: missing, or not a finished shard")
        elif meta.get("compat") != manifest["compat"] or not _listed_as(meta, entry, index):
            report.problems.append(f"{path}: written with other settings than the manifest's, or as another shard")
        else:
            rows += _check_shard(path, meta, entry, manifest, report)
            skipped += [item["key"] for item in meta["skipped"]]
        report.shards += 1
        bar.update(entry.get("rows", 0))
    bar.close()
    return rows, skipped


def _check_accounting(root: Path, manifest: dict, accounted: list[str], skipped: list[str], report: Report) -> None:
    """Rows and skipped images together are the source's keys, each once, as counted and as skipped.jsonl lists."""
    if len(set(accounted)) != len(accounted):
        report.problems.append(f"{root}: some keys appear in more than one shard")
    digest = manifest["source"].get("keys_sha256")  # none for input shards: their items were never listed
    found = manifests.keys_digest(sorted(accounted)) if digest else len(accounted)
    if found != (digest or manifest["counts"]["images"]) and not report.problems:
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
