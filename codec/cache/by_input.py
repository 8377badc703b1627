"""Encode a sharded source into a latent cache, one input shard at a time: incremental, resumable, any number of
processes and machines, local or on an object store.

The main process plans (codec.cache.input_plan: one listing, one manifest, footers only of inputs not shown
done) and hands the plan to every process; each takes its share of the inputs (largest first, to the least
loaded), so nothing but the output location is shared. DataLoader workers each stream whole inputs, decode and
crop; this process encodes, batched per bucket within one output part, so a part's latents do not depend on how
the workers' items interleave. A part is published whole (codec.cache.locations); the manifest, written last by
the main process, lists the parts. An input added, changed or removed touches only its own parts: nothing else
is rewritten, and a rerun with nothing new writes nothing at all.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from codec.cache import checksums, input_plan, manifest, shards
from codec.cache.identity import DTYPE_NAMES
from codec.cache.locations import Location
from codec.cache.preprocess import Prepared
from codec.cache.writer import NOT_FINITE, CacheModel, Group, Settings, Summary, _encode, _upscaled
from codec.sources import SourceError, decode_image

if TYPE_CHECKING:
    from codec.cache.shard_sources import ShardSource

log = logging.getLogger(__name__)
LAYOUT = "by-input"


@dataclass
class _Item:
    slot: int  # index into this process's work
    key: str
    prepared: Prepared | None
    carried: dict
    reason: str = ""


@dataclass
class _End:
    slot: int
    position: int  # items in the input


@dataclass
class _Failed:
    slot: int
    message: str


class _Stream(torch.utils.data.IterableDataset):
    """This process's inputs, each streamed whole by one DataLoader worker, as decoded and cropped items."""

    def __init__(self, source: ShardSource, work: list[input_plan.Work], settings: Settings) -> None:
        self.source, self.work, self.preprocessing = source, work, settings.preprocessing

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        slots = range(len(self.work)) if info is None else range(info.id, len(self.work), info.num_workers)
        for slot in slots:
            work = self.work[slot]
            position = work.start
            try:
                for sample in self.source.samples(work.input, work.start):
                    yield self._prepare(slot, sample)
                    position += 1
            except SourceError as error:
                yield _Failed(slot, str(error))
                return
            yield _End(slot, position)

    def _prepare(self, slot: int, sample) -> _Item:
        if sample.image is None:
            return _Item(slot, sample.key, None, sample.carried, sample.problem)
        try:
            image = decode_image(sample.image, self.preprocessing.max_pixels)
            return _Item(slot, sample.key, self.preprocessing(image), sample.carried)
        except Exception as error:  # one bad image must not end a run over millions: report it, go on
            return _Item(slot, sample.key, None, sample.carried, str(error) or type(error).__name__)


class _Part:
    """One output part as its items arrive: batched per bucket, encoded, collected as rows."""

    def __init__(self, work: input_plan.Work, part: int, first: int) -> None:
        self.work, self.part, self.first = work, part, first
        self.pending: dict[tuple[int, int], list[_Item]] = {}
        self.rows: list[shards.Row] = []
        self.skipped: list[dict] = []
        self.seen = 0

    def add(self, item: _Item, vae, settings: Settings) -> None:
        self.seen += 1
        if item.prepared is None:
            self.skip(item)
            return
        batch = self.pending.setdefault(item.prepared.bucket, [])
        batch.append(item)
        if len(batch) == settings.batch_size:
            self.flush(item.prepared.bucket, vae, settings)

    def skip(self, item: _Item) -> None:
        log.warning("skipping %s: %s", item.key, item.reason)
        self.skipped.append({"key": item.key, "input": self.work.input.name, "reason": item.reason})

    def flush(self, bucket, vae, settings: Settings) -> None:
        items, flip = self.pending.pop(bucket), settings.preprocessing.flip
        for item, latents in zip(items, _encode(vae, items, flip), strict=True):
            if not all(torch.isfinite(t).all() for t in latents):
                item.reason = NOT_FINITE
                self.skip(item)
                continue
            p = item.prepared
            row = shards.Row(item.key, latents[0], latents[1], p.bucket, p.original_size, p.crop_top_left, p.crop_box)
            row.carried = item.carried
            if flip:
                row.flip_mean, row.flip_logvar = latents[2:]
            self.rows.append(row)

    def finish(self, location: Location, source, vae, settings: Settings, record: tuple, final: bool, rank: int):
        """Encode what is pending, publish the part; returns its footer record."""
        import pyarrow.parquet as pq

        for bucket in list(self.pending):
            self.flush(bucket, vae, settings)
        self.rows.sort(key=lambda row: row.key)
        table = shards.rows_to_table(
            self.rows, settings.latent_dtype, settings.preprocessing.flip, source.carried_schema()
        )
        compat, compat_hash = record
        item = self.work.input
        digests = checksums.row_digests(table)
        meta = {
            "input": item.name, "part": self.part, "final": final, "fingerprint": item.fingerprint,
            "first": self.first, "count": self.seen, "rows": len(self.rows), "skipped": len(self.skipped),
            "upscaled": sum(1 for row in self.rows if _upscaled(row)),
            "compat": compat_hash, "record": compat, "written_by": rank, "checksum": checksums.shard_checksum(digests),
        }  # fmt: skip
        footer = {
            **meta, "skipped": sorted(self.skipped, key=lambda s: s["key"]),
            "row_checksums": checksums.row_checksums(digests),
        }  # fmt: skip
        table = table.replace_schema_metadata({shards.META_KEY: json.dumps(footer).encode()})
        buffer = io.BytesIO()
        # Latents are noise to a dictionary or to min/max statistics: computing them would only cost time.
        pq.write_table(table, buffer, use_dictionary=False, write_statistics=["key"])
        file = input_plan.part_file(item.name, self.part)
        location.write_bytes(file, buffer.getvalue())
        return input_plan.entry_of(file, meta), footer["skipped"]


def read_manifest(location: Location) -> dict | None:
    """The cache's manifest (None where there is none yet); one written from another kind of source is refused."""
    data = location.read_bytes(shards.MANIFEST)
    if data is None:
        return None
    where = location.name(shards.MANIFEST)
    found = manifest.parse_manifest(data, where, sections=False)
    if found.get("storage", {}).get("layout") != LAYOUT or not isinstance(found.get("shards", []), list):
        raise shards.CacheError(
            f"{where}: a cache of another kind of source (an image folder, a list or a dataset); write shards to a new output"
        )
    return found


class _Described:
    """What manifest.build_manifest reads of a source, for one that has no list of keys."""

    def __init__(self, source: ShardSource) -> None:
        self.keys, self.descriptor = (), source.descriptor


def _manifest(context: dict, entries: list[dict], complete: bool) -> dict:
    from codec.cache import manifest

    source, settings = context["source"], context["settings"]
    model = context["model"]
    found = manifest.build_manifest(
        model.vae, model.identities, model.name, _Described(source), settings, context["compat"],
        context["compat_hash"], 0,
    )  # fmt: skip
    entries = sorted(entries, key=lambda e: (e["input"], e["part"]))
    images = sum(e["count"] for e in entries)
    found["complete"] = complete
    found["source"] = {**source.descriptor(), "inputs": len(source.inputs), "images": images}
    found["storage"]["layout"] = LAYOUT
    found["counts"] = {
        "images": images, "rows": sum(e["rows"] for e in entries), "skipped": sum(e["skipped"] for e in entries),
        "shards": len(entries), "inputs": len(source.inputs),
    }  # fmt: skip
    found["shards"] = entries
    return found


def _write_manifest(location: Location, found: dict) -> bool:
    return location.write_if_changed(shards.MANIFEST, (json.dumps(found, indent=2) + "\n").encode())


def _share(group: Group, value):
    """The main process's `value`, on every process."""
    if group.accelerator is None or group.world == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _plan(location: Location, context: dict, group: Group):
    """On the main process: check the settings against the cache, decide, and mark the cache incomplete where
    anything will be written or removed. Every process gets the plan (or stops with the main one's refusal)."""
    plan, refusal = None, None
    if group.is_main:
        try:
            found = read_manifest(location)
            if found is not None:
                shards.check_compatible(
                    found.get("compat_record", {}), context["compat"], location.name(shards.MANIFEST)
                )
            current = found is not None and found.get("compat") == context["compat_hash"]
            recorded = found.get("shards", []) if found is not None else []
            source = context["source"]
            plan = input_plan.make_plan(
                location, source.inputs, recorded, current, context["compat_hash"], context["compat"]
            )
            location.remove_temporaries("", ".")  # what killed local runs left: a manifest's, a part's
            location.remove_temporaries(shards.DATA_DIR, ".")
            names = {entry["file"] for entry in plan.kept}
            if plan.work or any(entry.get("file") not in names for entry in recorded) or found is None:
                _write_manifest(location, _manifest(context, plan.kept, complete=False))
        except Exception as error:  # any: the other ranks must not be left waiting for this one
            refusal = error
    group.stop_together(refusal)
    return _share(group, plan)


def _encode_share(location: Location, context: dict, work: list[input_plan.Work], group: Group, on_part_written):
    """Encode this process's inputs; returns the entries and skipped images of the parts it wrote."""
    source, vae, settings = context["source"], context["model"].vae, context["settings"]
    record = (context["compat"], context["compat_hash"])
    loader = torch.utils.data.DataLoader(
        _Stream(source, work, settings), batch_size=None, num_workers=min(settings.num_workers, len(work))
    )
    where = f" (rank {group.rank} of {group.world})" if group.world > 1 else ""
    bar = tqdm(
        total=len(work), desc=f"cache{where}", unit="shard", disable=not (settings.progress and group.is_main and work)
    )
    parts: dict[int, _Part] = {}
    entries, skipped = [], []

    def publish(part: _Part, final: bool) -> None:
        entry, lines = part.finish(location, source, vae, settings, record, final, group.rank)
        entries.append(entry)
        skipped.extend(lines)
        if on_part_written is not None:
            on_part_written(entry)

    for item in loader:
        if isinstance(item, _Failed):
            raise shards.CacheError(item.message)
        part = parts.get(item.slot) or _Part(work[item.slot], work[item.slot].part, work[item.slot].start)
        if isinstance(item, _End):
            publish(part, final=True)
            parts.pop(item.slot, None)
            bar.update(1)
            continue
        if part.seen == settings.shard_size:  # full: published once another item shows it is not the last
            publish(part, final=False)
            part = _Part(part.work, part.part + 1, part.first + part.seen)
        parts[item.slot] = part
        part.add(item, vae, settings)
    bar.close()
    return entries, skipped


def _gather(group: Group, value: list) -> list:
    if group.accelerator is None or group.world == 1:
        return value
    from accelerate.utils import gather_object

    return gather_object(value)


def _skipped_lines(location: Location, plan: input_plan.Plan, new: list[dict]) -> list[dict]:
    """Every skipped image of the cache: this run's, those found in footers, and the earlier report's for inputs
    left as they were (read again from their footers where that report does not account for them)."""
    earlier: dict[str, list[dict]] = {}
    for line in (location.read_bytes(shards.SKIPPED) or b"").decode("utf-8", "replace").splitlines():
        try:
            entry = json.loads(line)
            earlier.setdefault(entry["input"], []).append(entry)
        except (ValueError, KeyError, TypeError):
            continue
    lines, counted = list(new), {}
    for entry in plan.kept:
        counted[entry["input"]] = counted.get(entry["input"], 0) + entry["skipped"]
    for name, count in counted.items():
        if name in plan.kept_skipped:
            lines += plan.kept_skipped[name]
        elif len(earlier.get(name, [])) == count:
            lines += earlier.get(name, [])
        else:
            files = [e["file"] for e in plan.kept if e["input"] == name]
            lines += [s for f in files for s in (input_plan.read_part_meta(location, f) or {}).get("skipped", [])]
    return sorted(lines, key=lambda s: s["key"])


def _finish(location: Location, context: dict, plan: input_plan.Plan, entries: list[dict], skipped: list[dict]) -> dict:
    """On the main process, once every process is done: the skipped report, the manifest, and only then the
    removal of parts the manifest no longer lists (inputs removed, or shorter than before)."""
    source = context["source"]
    entries = plan.kept + entries
    finals = {e["input"] for e in entries if e["final"]}
    missing = [item.name for item in source.inputs if item.name not in finals]
    if missing:
        raise shards.CacheError(
            f"{location.given}: {len(missing)} input(s) unfinished after every process ended (first: {missing[0]})"
        )
    report = "".join(json.dumps(line) + "\n" for line in _skipped_lines(location, plan, skipped))
    location.write_if_changed(shards.SKIPPED, report.encode())
    found = _manifest(context, entries, complete=True)
    _write_manifest(location, found)
    listed = {entry["file"].rsplit("/", 1)[-1] for entry in entries}
    for name in location.list(shards.DATA_DIR):
        if name.endswith(".parquet") and name not in listed:
            file = f"{shards.DATA_DIR}/{name}"
            if input_plan.read_part_meta(location, file) is None:
                log.warning(
                    "%s: not a part written by `codec cache`; left in place, but readers of data/*.parquet would take it for one",
                    location.name(file),
                )
                continue
            log.info("removing %s: its input is gone or shorter", location.name(file))
            location.remove(file)
    return found


def build_by_input(
    source: ShardSource,
    out: str,
    model: CacheModel,
    settings: Settings,
    *,
    group: Group | None = None,
    on_part_written: Callable[[dict], None] | None = None,
) -> Summary:
    """Encode every input shard of `source` not already cached in `out` (a path or fsspec URL). Shard counts in
    the summary are parts, every process's together; rows, skipped and upscaled are filled in on the main one."""
    started = time.perf_counter()
    group = group or Group()
    settings.check(source, model.vae)
    vae = model.vae
    compat = shards.compat_record(
        model.identities["float32"], settings.preprocessing.to_dict(), settings.latent_dtype,
        DTYPE_NAMES.get(vae.dtype, str(vae.dtype)), settings.shard_size, {**source.descriptor(), "layout": LAYOUT},
    )  # fmt: skip
    context = {
        "source": source, "model": model, "settings": settings, "compat": compat,
        "compat_hash": shards.compat_hash(compat),
    }  # fmt: skip
    location = Location(out)
    plan = _plan(location, context, group)
    mine = input_plan.assign(plan.work, group.world)[group.rank]
    entries, skipped = _encode_share(location, context, mine, group, on_part_written)
    entries, skipped = _gather(group, entries), _gather(group, skipped)  # also a barrier
    summary = Summary(reused=len(plan.kept), written=len(entries))
    if group.is_main:
        found = _finish(location, context, plan, entries, skipped)
        counts = found["counts"]
        summary.images, summary.rows, summary.skipped = counts["images"], counts["rows"], counts["skipped"]
        summary.shards, summary.upscaled = counts["shards"], sum(e.get("upscaled") or 0 for e in found["shards"])
    group.barrier()
    summary.seconds = time.perf_counter() - started
    return summary
