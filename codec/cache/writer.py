"""Encode a source into a latent cache: deterministic shards, resumable, one process or many.

The plan is fixed by the sorted keys and the shard size: shards are content-defined blocks of the keys
(codec.cache.key_blocks), block i belongs to rank i % world, and its file is named by its first key. A shard is done
when its file exists with this run's settings and its keys' fingerprint in the footer, so a second run (or a run
with another number of processes) skips it; a shard whose files changed is re-encoded, and an added or removed
image changes only its own block. DataLoader workers decode and crop images while this process encodes; a shard's images are batched
by bucket and flushed at the shard's end, so a resumed shard is encoded in exactly the same batches.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from codec import latent_norm
from codec.cache import checksums, key_blocks, manifest, shards
from codec.cache.identity import DTYPE_NAMES, is_legacy, same_codec
from codec.cache.preprocess import Prepared, Preprocessing, to_model_input

if TYPE_CHECKING:
    from codec.cache.sources import Source
    from codec.model import AutoencoderKL

log = logging.getLogger(__name__)
NOT_FINITE = "the codec's output is not finite for this image"  # why such an image is skipped, in every engine


@dataclass
class Settings:
    """How a cache is written: what the shards hold (preprocessing, dtype, shard size) and how the run goes."""

    preprocessing: Preprocessing
    latent_dtype: str = "fp16"
    batch_size: int = 16
    num_workers: int = 0
    shard_size: int = 1000
    progress: bool = True  # a bar on the main process

    def check(self, source, vae) -> None:
        """Refuse settings that cannot make this cache, before anything is written."""
        self.preprocessing.check_factor(latent_norm.pixel_multiple(vae.config))  # FLUX.2's: whole 2x2 patches
        if self.latent_dtype not in shards.LATENT_DTYPES:
            raise ValueError(f"latent dtype {self.latent_dtype!r}: choose one of {', '.join(shards.LATENT_DTYPES)}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard size and batch size must be positive, got {self.shard_size}, {self.batch_size}")
        if self.num_workers < 0:  # before the manifest: the DataLoader's own refusal came after it
            raise ValueError(f"--num-workers must be 0 (decode in this process) or more, got {self.num_workers}")
        clashes = [name for name in source.carried_schema().names if name in shards.RESERVED_COLUMNS]
        if clashes:
            raise ValueError(
                f"{source.name}: column(s) {clashes} would clash with the cache's own; pick others with --columns"
            )


@dataclass
class CacheModel:
    """The codec that encodes: the model, its identities (see codec.cache.identity) and the name the manifest
    records for it."""

    vae: AutoencoderKL
    identities: dict[str, str]
    name: str


@dataclass
class Summary:
    images: int = 0
    rows: int = 0
    skipped: int = 0
    shards: int = 0
    reused: int = 0  # shards found done, by every process together
    written: int = 0  # shards encoded, by every process together
    upscaled: int = 0  # rows whose image was smaller than its bucket on a side, so it was enlarged to cover it
    seconds: float = 0.0


@dataclass
class _Loaded:
    index: int  # into source.keys
    prepared: Prepared | None
    carried: dict
    reason: str = ""


class _Items(torch.utils.data.Dataset):
    """Positions of a source -> decoded, cropped images (or the reason they could not be), in DataLoader workers."""

    def __init__(self, source, positions: list[int], preprocessing: Preprocessing) -> None:
        self.source, self.positions, self.preprocessing = source, positions, preprocessing

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, position: int) -> _Loaded:
        index = self.positions[position]
        try:
            image, carried = self.source.load(index, self.preprocessing.max_pixels)
            return _Loaded(index, self.preprocessing(image), carried)
        except Exception as error:  # one bad image must not end a run over millions: report it, go on
            return _Loaded(index, None, {}, str(error) or type(error).__name__)


def _as_list(batch: list) -> list:
    return batch


class Group:
    """The processes of this run: an `accelerate.Accelerator` (see codec.distributed), or this process alone."""

    def __init__(self, accelerator=None) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def sum(self, value: int) -> int:
        """`value` summed over the processes (every rank gets the total)."""
        if self.accelerator is None or self.world == 1:
            return value
        from accelerate.utils import gather_object

        return sum(gather_object([value]))

    def stop_together(self, refusal: Exception | None) -> None:
        """Raise on every rank if any rank refused (`refusal`, or None where its checks passed).

        A rank that raised alone left the others in their next collective, to die of its closed connection with
        a traceback from inside torch; the user should read the reason once per rank, plainly."""
        if self.accelerator is None or self.world == 1:
            if refusal is not None:
                raise refusal
            return
        from accelerate.utils import gather_object

        reasons = gather_object([None if refusal is None else str(refusal)])
        if refusal is not None:
            raise refusal
        for rank, reason in enumerate(reasons):
            if reason is not None:
                raise shards.CacheError(f"stopped, since rank {rank} refused: {reason}")


@torch.no_grad()
def _encode(vae, items: list[_Loaded], flip: bool) -> list[tuple[torch.Tensor, ...]]:
    x = to_model_input(torch.stack([item.prepared.pixels for item in items]))
    if flip:
        x = torch.cat([x, x.flip(-1)])
    posterior = vae.encode(x.to(vae.device)).latent_dist
    mean, logvar = posterior.mean.float().cpu(), posterior.logvar.float().cpu()
    n = len(items)
    if flip:
        return list(zip(mean[:n], logvar[:n], mean[n:], logvar[n:], strict=True))
    return list(zip(mean, logvar, strict=True))


def _upscaled(row: shards.Row) -> bool:
    """Whether the image had to be enlarged to cover its bucket (a blurrier input than the resolution suggests)."""
    return row.original_size[0] < row.bucket[0] or row.original_size[1] < row.bucket[1]


class _ShardBuilder:
    """One shard's images as they arrive: batched per bucket, encoded, collected as rows in key order."""

    def __init__(self, index: int, keys: range, fingerprint: str, file: str) -> None:
        self.index, self.keys, self.fingerprint, self.file = index, keys, fingerprint, file
        self.pending: dict[tuple[int, int], list[_Loaded]] = {}
        self.rows: list[shards.Row] = []
        self.skipped: list[dict] = []
        self.seen = 0

    def add(self, item: _Loaded, source, vae, settings: Settings) -> None:
        self.seen += 1
        if item.prepared is None:
            self.skip(item, source)
            return
        batch = self.pending.setdefault(item.prepared.bucket, [])
        batch.append(item)
        if len(batch) == settings.batch_size:
            self.flush(item.prepared.bucket, source, vae, settings)

    def skip(self, item: _Loaded, source) -> None:
        key = source.keys[item.index]
        log.warning("skipping %s: %s", source.describe(item.index), item.reason)
        self.skipped.append({"key": key, "source": source.describe(item.index), "reason": item.reason})

    def flush(self, bucket, source, vae, settings: Settings) -> None:
        items = self.pending.pop(bucket)
        flip = settings.preprocessing.flip
        for item, latents in zip(items, _encode(vae, items, flip), strict=True):
            if not all(torch.isfinite(t).all() for t in latents):
                item.reason = NOT_FINITE
                self.skip(item, source)
                continue
            p = item.prepared
            row = shards.Row(
                source.keys[item.index], latents[0], latents[1], p.bucket, p.original_size, p.crop_top_left, p.crop_box
            )
            row.carried = item.carried
            if flip:
                row.flip_mean, row.flip_logvar = latents[2:]
            self.rows.append(row)

    @property
    def complete(self) -> bool:
        return self.seen == len(self.keys)

    def finish(self, out: Path, source, vae, settings: Settings, compat: dict, compat_hash: str, rank: int) -> None:
        for bucket in list(self.pending):
            self.flush(bucket, source, vae, settings)
        self.rows.sort(key=lambda row: row.key)
        table = shards.rows_to_table(
            self.rows, settings.latent_dtype, settings.preprocessing.flip, source.carried_schema()
        )
        digests = checksums.row_digests(table)
        meta = {
            "first_key": source.keys[self.keys.start],
            "compat": compat_hash,
            "record": compat,
            "fingerprint": self.fingerprint,
            "count": len(self.keys),
            "rows": len(self.rows),
            "skipped": sorted(self.skipped, key=lambda s: s["key"]),
            "upscaled": sum(1 for row in self.rows if _upscaled(row)),
            "written_by": rank,
            "checksum": checksums.shard_checksum(digests),
            "row_checksums": checksums.row_checksums(digests),
        }
        shards.write_shard(out, self.index, table, meta, path=out / self.file)


def _clean(out: Path, files: set[str], before_removing_shards: Callable[[], None]) -> None:
    """Before any rank writes: drop temporary files of killed runs and shards of blocks no longer in the plan
    (calling `before_removing_shards` first: the manifest must stop calling the cache complete before any of the
    shards it lists goes)."""
    for name in (shards.MANIFEST, shards.SKIPPED):
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    data = out / shards.DATA_DIR
    if not data.is_dir():
        return
    for tmp in data.glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)
    surplus = []
    for path in sorted(data.glob("shard-*.parquet")):
        if f"{shards.DATA_DIR}/{path.name}" not in files:
            if shards.read_shard_meta(path) is None:  # another tool's file, perhaps: not ours to delete
                log.warning(
                    "%s: not a shard written by `codec cache`; left in place, but move it out of data/: readers of "
                    "data/*.parquet would take it for one",
                    path,
                )
                continue
            surplus.append(path)
    if surplus:
        before_removing_shards()
    for path in surplus:
        log.info("removing %s: not a shard of this plan", path)
        path.unlink()


def _identities_as_recorded(existing: dict | None, vae, identities: dict[str, str]) -> dict[str, str]:
    """A cache written before 0.2 names its codec by the older identity (every weight hashed): a run with the same
    codec keeps that name, so that its shards stay current rather than all being encoded again."""
    recorded = (existing or {}).get("codec", {}).get("identities", {})
    if recorded and all(is_legacy(i) for i in recorded.values()) and same_codec(vae, recorded.values()):
        return dict(recorded)
    return identities


def _stale_shards(run: _Run, summary: Summary) -> list[_ShardBuilder]:
    """This rank's shards that must be encoded (counting those already done in `summary.reused`); refuses a shard
    written with other settings."""
    todo = []
    for index in range(run.group.rank, run.n_shards, run.group.world):
        keys, file = run.blocks[index], run.files[index]
        fingerprint = run.source.fingerprint(keys)
        path = run.out / file
        meta = shards.read_shard_meta(path)
        if meta is not None and meta.get("compat") != run.compat_hash:
            shards.check_compatible(meta.get("record", {}), run.compat, path)
        # Reused only under this run's exact record: one that compares equal but hashes otherwise (written by an
        # older version) is encoded again, or the final check below would count it as missing.
        current = meta is not None and meta.get("compat") == run.compat_hash
        if current and meta.get("fingerprint") == fingerprint and meta.get("count") == len(keys):
            summary.reused += 1
            continue
        if meta is not None:
            why = "its source files changed" if current else "its settings were recorded differently"
            log.info("%s is stale (%s); encoding it again", path, why)
        todo.append(_ShardBuilder(index, keys, fingerprint, file))
    return todo


@dataclass
class _Run:
    """One run's fixed facts: where, what, with which codec and settings, and the record every shard must carry."""

    out: Path
    source: Source
    model: CacheModel
    settings: Settings
    group: Group
    compat: dict
    compat_hash: str
    blocks: list[range]  # positions in source.keys, in key order
    files: list[str]  # each block's shard, relative to `out`

    @property
    def n_shards(self) -> int:
        return len(self.blocks)

    def manifest(self, metas: list[dict] | None = None) -> dict:
        model, settings = self.model, self.settings
        found = manifest.build_manifest(
            model.vae, model.identities, model.name, self.source, settings, self.compat, self.compat_hash,
            self.n_shards, metas=metas, files=self.files,
        )  # fmt: skip
        found["storage"]["layout"] = key_blocks.LAYOUT
        return found


def build_cache(
    source: Source,
    out: str | Path,
    model: CacheModel,
    settings: Settings,
    *,
    group: Group | None = None,
    on_shard_written: Callable[[int], None] | None = None,
) -> Summary:
    """Encode every key of `source` not already cached in `out`. The summary's shard counts (reused, written)
    are every process's together; rows, skipped and upscaled are filled in on the main process only."""
    started = time.perf_counter()
    settings.check(source, model.vae)
    run = _plan(Path(out), source, model, settings, group or Group())
    summary = Summary(images=len(source.keys), shards=run.n_shards)
    refusal, todo = None, []
    try:
        todo = _stale_shards(run, summary)
    except Exception as error:  # any (a footer of another shape, a vanished file): every rank stops with it
        refusal = error
    run.group.stop_together(refusal)
    # Incomplete only while shards change: the codec is on record from the first shard on, and an interrupted
    # rerun with nothing to do leaves a complete cache complete.
    if run.group.sum(len(todo)) and run.group.is_main:
        manifest.write_manifest(run.out, run.manifest())
    run.group.barrier()
    summary.written = _write_stale(run, todo, on_shard_written)
    summary.reused, summary.written = run.group.sum(summary.reused), run.group.sum(summary.written)  # a barrier too
    if run.group.is_main:
        _complete(run, summary)
    summary.seconds = time.perf_counter() - started
    return summary


def _plan(out: Path, source: Source, model: CacheModel, settings: Settings, group: Group) -> _Run:
    """This run's record, checked against the cache already in `out`; the main process clears leftovers."""
    existing = manifest.read_manifest(out)
    vae = model.vae
    model = CacheModel(vae, _identities_as_recorded(existing, vae, model.identities), model.name)
    # The cache is named by the weights' float32 identity; the precision they ran at is recorded beside it.
    compat = shards.compat_record(
        model.identities["float32"], settings.preprocessing.to_dict(), settings.latent_dtype,
        DTYPE_NAMES.get(vae.dtype, str(vae.dtype)), settings.shard_size, source.descriptor(),
    )  # fmt: skip
    if existing is not None:
        shards.check_compatible(existing.get("compat_record", {}), compat, out)  # every rank refuses alike
    blocks = key_blocks.plan_blocks(source.keys, settings.shard_size)
    files = [key_blocks.block_file(source.keys[block.start]) for block in blocks]
    run = _Run(out, source, model, settings, group, compat, shards.compat_hash(compat), blocks, files)
    refusal = None
    if group.is_main:
        _note_positional_layout(out, existing)
        try:
            if existing is None:  # shards without a manifest (deleted by hand?): their footers say what they are
                for path in sorted((out / shards.DATA_DIR).glob("shard-*.parquet")):
                    meta = shards.read_shard_meta(path)
                    if meta is not None and meta.get("compat") != run.compat_hash:
                        shards.check_compatible(meta.get("record", {}), compat, path)
            _clean(out, set(files), lambda: manifest.write_manifest(out, run.manifest()))
        except Exception as error:  # any: the other ranks must not be left waiting for this one
            refusal = error
    group.stop_together(refusal)
    return run


def _note_positional_layout(out: Path, existing: dict | None) -> None:
    """Say so where a cache was written in shards by position (before blocks): its shards are all encoded again,
    once, rather than mixed with blocks."""
    data = out / shards.DATA_DIR
    recorded = (existing or {}).get("storage", {}).get("layout")
    old = recorded != key_blocks.LAYOUT and (
        existing is not None or any(key_blocks.is_positional(p.name) for p in data.glob("shard-*.parquet"))
    )
    if old and data.is_dir():
        log.warning(
            "%s: written with shards of positions in the key order (an earlier version); encoding it once again in "
            "blocks of keys, after which adding or removing an image re-encodes only its own block",
            out,
        )


def _write_stale(run: _Run, todo: list[_ShardBuilder], on_shard_written: Callable[[int], None] | None) -> int:
    """Decode, encode and write this rank's stale shards; returns how many it wrote."""
    source, settings, group = run.source, run.settings, run.group
    positions = [i for builder in todo for i in builder.keys]
    loader = torch.utils.data.DataLoader(
        _Items(source, positions, settings.preprocessing),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        collate_fn=_as_list,
    )
    where = f" (rank {group.rank} of {group.world})" if group.world > 1 else ""
    shown = settings.progress and group.is_main and bool(positions)
    bar = tqdm(total=len(positions), desc=f"cache{where}", unit="img", disable=not shown)
    written, pending = 0, iter(todo)
    builder = next(pending, None)
    for batch in loader:
        for item in batch:
            builder.add(item, source, run.model.vae, settings)
            if builder.complete:
                builder.finish(run.out, source, run.model.vae, settings, run.compat, run.compat_hash, group.rank)
                written += 1
                if on_shard_written is not None:
                    on_shard_written(builder.index)
                builder = next(pending, None)
        bar.update(len(batch))
    bar.close()
    return written


def _complete(run: _Run, summary: Summary) -> None:
    """On the main process, once every shard is written: skipped.jsonl, the counts, and the complete manifest."""
    out = run.out
    metas = [shards.read_shard_meta(out / file) for file in run.files]
    missing = [i for i, m in enumerate(metas) if m is None or m.get("compat") != run.compat_hash]
    if missing:
        raise shards.CacheError(f"{out}: shard(s) {missing} missing after every process finished")
    skipped = [entry for m in metas for entry in m["skipped"]]
    report = "".join(json.dumps(entry) + "\n" for entry in skipped)
    shards.atomic_write(out / shards.SKIPPED, lambda tmp: tmp.write_text(report))
    summary.rows, summary.skipped = sum(m["rows"] for m in metas), len(skipped)
    summary.upscaled = sum(m.get("upscaled", 0) for m in metas)  # shards written before it was counted: 0
    manifest.write_manifest(out, run.manifest(metas))
