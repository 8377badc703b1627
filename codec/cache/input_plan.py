"""The plan of a cache built from input shards: which inputs are done, which resume where, which go.

Each input shard's rows go to its own output parts, `data/STEM-00000.parquet`, `data/STEM-00001.parquet`, ...
(STEM from the input's name; at most shard_size items each, the last marked final). A part's footer records
its input, that input's fingerprint, the part's first item and item count, so an input is done when its parts
0..k are there with its current fingerprint and part k is final, and a killed run resumes after its last part.
The manifest repeats every part's record, so a rerun decides from one file which inputs are done and reads
footers only for the rest: planning costs a listing and a manifest, not a request per output.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from codec.cache import shards
from codec.cache.locations import Location
from codec.cache.patterns import Input

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SHARD_SUFFIX = re.compile(r"(\.tar(\.gz)?|\.tgz|\.parquet)$", re.IGNORECASE)
ENTRY_FIELDS = ("input", "part", "final", "fingerprint", "first", "count", "rows", "skipped", "upscaled", "checksum")


def part_file(input_name: str, part: int) -> str:
    """The output file of an input's part: its name made safe (with a short hash wherever that changed it)."""
    base = _SHARD_SUFFIX.sub("", input_name)
    stem = _UNSAFE.sub("_", base)
    if stem != base or not stem:
        stem += "-" + hashlib.sha256(input_name.encode()).hexdigest()[:8]
    return f"{shards.DATA_DIR}/{stem}-{part:05d}.parquet"


@dataclass
class Work:
    """An input to encode from part `part` on, whose first `start` items are in parts already written."""

    input: Input
    part: int = 0
    start: int = 0


@dataclass
class Plan:
    kept: list[dict] = field(default_factory=list)  # entries of parts that stay as they are
    kept_skipped: dict[str, list[dict]] = field(default_factory=dict)  # by input, where read from footers
    work: list[Work] = field(default_factory=list)


def entry_of(file: str, meta: dict) -> dict:
    """A part's manifest entry, from its footer record (which lists its skipped images; the entry counts them)."""
    entry = {"file": file, **{name: meta.get(name) for name in ENTRY_FIELDS}}
    if isinstance(entry["skipped"], list):
        entry["skipped"] = len(entry["skipped"])
    return entry


def read_part_meta(location: Location, file: str) -> dict | None:
    """A part's footer record, or None when it is missing or not a finished part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with location.open(file) as stream:
            metadata = pq.read_schema(stream).metadata or {}
        meta = json.loads(metadata[shards.META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("record", {}), dict) else None


def _contiguous_done(entries: list[dict], item: Input) -> bool:
    entries = sorted(entries, key=lambda e: e.get("part", -1))
    return (
        bool(entries)
        and [e.get("part") for e in entries] == list(range(len(entries)))
        and all(e.get("fingerprint") == item.fingerprint for e in entries)
        and entries[-1].get("final") is True
    )


def _probe(location: Location, item: Input, compat_hash: str, compat: dict) -> tuple[list[dict], list[dict], bool]:
    """An input's finished parts, read from their footers in order: (entries, skipped images, all done)."""
    entries, skipped = [], []
    part = 0
    while True:
        file = part_file(item.name, part)
        meta = read_part_meta(location, file)
        if meta is None:
            return entries, skipped, False
        if meta.get("compat") != compat_hash:  # other settings are refused; an older record is encoded again
            shards.check_compatible(meta.get("record", {}), compat, location.name(file))
            return entries, skipped, False
        start = entries[-1]["first"] + entries[-1]["count"] if entries else 0
        if meta.get("input") != item.name or meta.get("fingerprint") != item.fingerprint or meta.get("first") != start:
            return entries, skipped, False
        entries.append(entry_of(file, meta))
        skipped += meta.get("skipped", [])
        if meta.get("final"):
            return entries, skipped, True
        part += 1


def make_plan(
    location: Location, inputs: list[Input], recorded: list[dict], current: bool, compat_hash: str, compat: dict
) -> Plan:
    """Decide for every input. `recorded`: the manifest's part entries, trusted (`current`) when its settings
    are this run's; an input it does not show done has its footers read."""
    by_input: dict[str, list[dict]] = {}
    for entry in recorded if current else []:
        by_input.setdefault(entry.get("input"), []).append(entry)
    plan = Plan()
    for item in inputs:
        entries = by_input.get(item.name, [])
        if _contiguous_done(entries, item):
            plan.kept += sorted(entries, key=lambda e: e["part"])
            continue
        found, skipped, done = _probe(location, item, compat_hash, compat)
        plan.kept += found
        plan.kept_skipped[item.name] = skipped
        if not done:
            start = found[-1]["first"] + found[-1]["count"] if found else 0
            plan.work.append(Work(item, len(found), start))
    return plan


def assign(work: list[Work], world: int) -> list[list[Work]]:
    """Work shared among `world` processes, largest inputs first to the least loaded: every process computes the
    same split from the same plan, so nothing but the plan is exchanged."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for item in sorted(work, key=lambda w: (-w.input.size, w.input.name)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(item)
        loads[rank] += max(item.input.size, 1)
    return [sorted(share, key=lambda w: w.input.name) for share in shares]
