"""Streaming a latent cache: `LatentStream`, bucket batches read shard by shard, for caches too large to index up
front or kept on object storage, split across ranks and DataLoader workers, with a resumable position.

    stream = LatentStream("s3://bucket/cache", codec=vae, batch_size=32, seed=0)  # or a local folder
    loader = stream.loader(num_workers=4, persistent_workers=True)   # a DataLoader that reports what was taken
    stream.load_state_dict(checkpoint["data"])                        # resuming: continues where it stopped
    for epoch in range(stream.epoch, epochs):
        for batch in loader:                                          # (B, C, h, w) latents, one bucket per batch
            ...
            checkpoint["data"] = stream.state_dict()                  # epoch, samples and batches taken in it
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from codec.cache import blocks
from codec.cache.batching import BatchPlan, Row, rows_of
from codec.cache.items import LATENT_NUMPY, META_COLUMNS, ItemMaker, carried_columns, collate, open_cache
from codec.cache.location import CacheLocation
from codec.cache.shards import CacheError

POSITION = "stream_position"  # what a batch made in a DataLoader worker carries back to StreamLoader
MAX_WORKERS = 256
BUFFER_BYTES = 64 << 20  # default shuffle buffer per worker, in latents as stored
_STATE_KEYS = ("world_size", "batch_size", "seed", "shuffle", "shuffle_buffer", "drop_last", "even_batches")


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Given, else torch.distributed's, else what torchrun and `accelerate launch` put in the environment."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else int(os.environ.get("RANK", 0))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


class LatentStream(torch.utils.data.IterableDataset):
    """Batches of scaled latents, one bucket each, streamed from a cache written by `codec cache` (a folder or an
    fsspec URL, opened with `storage_options`). Items are exactly `LatentDataset`'s (same latents, samples, flips,
    keys and columns for the same seed and epoch; `codec`, `posterior`, `flip`, `columns`, `scaling_factor`,
    `shift_factor` and `normalize` mean what they mean there); only the order and the grouping differ.

    Each epoch the shards are taken in an order shuffled by (seed, epoch), as one sequence of rows cut into
    `world_size` equal contiguous parts (rank and world from torch.distributed, else the RANK and WORLD_SIZE that
    torchrun and `accelerate launch` set, else given), each cut again among the DataLoader workers. A worker
    streams its part through a shuffle buffer of `shuffle_buffer` items (default: as many as fit in 64 MiB),
    seeded by (seed, epoch, rank, worker), and groups what leaves it by bucket into batches of `batch_size`; at the
    end a bucket's remainder is a smaller batch unless `drop_last`. Under several ranks (`even_batches`, the
    default there), every worker stops after the same number of full batches, the most that every one is sure to
    fill, so that every rank takes the same number of steps (DDP would hang otherwise): a few items per worker sit
    out each epoch, different ones each time.

    Iterate through `loader(...)`, a DataLoader that reports back which batches the trainer took: then
    `state_dict()` gives the epoch and how many batches and samples of it were taken, and `load_state_dict()` in a
    new process continues with the next one (the same number of workers, ranks and batch size are needed mid-epoch).
    A finished pass moves the stream on to the next epoch; `set_epoch` chooses one. Memory per worker: the shuffle
    buffer and each bucket's unfinished batch (buckets x (batch_size - 1) items), as stored, plus a few MiB read.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        codec: Any,
        batch_size: int,
        posterior: str = "sample",
        seed: int = 0,
        flip: bool = True,
        columns: Sequence[str] | str | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        normalize: str | None = None,
        shuffle: bool = True,
        shuffle_buffer: int | None = None,
        drop_last: bool = False,
        even_batches: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.location = CacheLocation(root, storage_options)
        self.manifest = open_cache(self.location, codec)
        self._files = [entry["file"] for entry in self.manifest["shards"]]
        self._rows = np.asarray([_row_count(entry, self.location) for entry in self.manifest["shards"]], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._rows)]).astype(np.int64)
        names = []
        if self._files:
            with blocks.open_shard(self.location, self._files[0]) as parquet:
                names = parquet.schema_arrow.names
        self.carried_columns = carried_columns(names, columns, self.location.where(self._files[0] if names else ""))
        self._maker = ItemMaker(
            self.manifest, str(self.location), codec, posterior=posterior, seed=seed, flip=flip,
            has_flip="flip_mean" in names, scaling_factor=scaling_factor, shift_factor=shift_factor,
            normalize=normalize,
        )  # fmt: skip
        self._given_world = world_size is not None
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.even_batches = self.world_size > 1 if even_batches is None else even_batches
        self.shuffle_buffer = self._default_buffer() if shuffle_buffer is None else shuffle_buffer
        self._buckets = self._bucket_count() if self.even_batches else 0
        self._columns = [*META_COLUMNS, *self.carried_columns, *self._maker.latent_columns]
        # Shared with DataLoader workers (persistent ones too): [epoch, the worker whose batch the trainer takes next,
        # batches each worker has had taken].
        self._control = torch.zeros(2 + MAX_WORKERS, dtype=torch.int64).share_memory_()
        self._taken, self._samples, self._workers, self._next, self._driven = {}, 0, 1, 0, False

    def _item_bytes(self) -> int:
        """About what one item's latents take as stored, from the resolution (buckets have about its area)."""
        info, prep = self.manifest["codec"], self.manifest["preprocessing"]
        side = int(prep.get("resolution", 512)) // int(info.get("downsample_factor", 8))
        itemsize = np.dtype(LATENT_NUMPY[self._maker.latent_dtype]).itemsize
        return int(info.get("latent_channels", 4)) * side * side * itemsize * len(self._maker.latent_columns)

    def _default_buffer(self) -> int:
        return int(np.clip(BUFFER_BYTES // max(1, self._item_bytes()), 64, 10_000))

    def _bucket_count(self) -> int:
        listed = self.manifest["preprocessing"].get("bucket_list")
        if listed:
            return len(listed)
        found = set()  # a manifest that does not list them: read the small bucket column of every shard
        for relative, rows in zip(self._files, self._rows, strict=True):
            for _, batch in blocks.iter_batches(self.location, relative, 0, int(rows), ["bucket"], 1 << 16, int(rows)):
                found.update(map(tuple, batch.column("bucket").to_pylist()))
        return max(1, len(found))

    # The position: what the main process knows of what the trainer took.
    @property
    def epoch(self) -> int:
        return int(self._control[0])

    def set_epoch(self, epoch: int) -> None:
        """Stream `epoch` next, from its start (or, for the epoch a loaded state is in, from where it stopped)."""
        if epoch != self.epoch:
            self._control[0] = epoch
            self._taken, self._samples, self._next = {}, 0, 0

    def state_dict(self) -> dict:
        """{"epoch", "samples" and "batches" taken in it (per worker), and the settings a resume must share}."""
        workers = max([self._workers, *(w + 1 for w in self._taken)])
        state = {
            "epoch": self.epoch,
            "samples": self._samples,
            "batches": [self._taken.get(w, 0) for w in range(workers)],
            "next_worker": self._next,
        }
        return {**state, **{key: getattr(self, key) for key in _STATE_KEYS}}

    def load_state_dict(self, state: dict) -> None:
        taken = [int(n) for n in state.get("batches", [])]
        if any(taken):
            changed = [
                f"{key} {state[key]!r} -> {getattr(self, key)!r}"
                for key in _STATE_KEYS
                if key in state and state[key] != getattr(self, key)
            ]
            if changed:
                raise ValueError(
                    f"cannot resume epoch {state['epoch']} mid-way with other settings ({', '.join(changed)}): the "
                    f"batches would differ; keep them, or start the next epoch with set_epoch({state['epoch'] + 1})"
                )
        self._control[0] = int(state["epoch"])
        self._taken = {w: n for w, n in enumerate(taken) if n}
        self._samples, self._workers = int(state.get("samples", 0)), max(1, len(taken))
        self._next = int(state.get("next_worker", 0))

    def _begin(self, workers: int) -> None:
        """A pass starts with `workers` DataLoader workers (1: this process): each skips what it had taken."""
        if workers > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} DataLoader workers read a LatentStream, got {workers}")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not self._given_world and distributed and torch.distributed.get_world_size() != self.world_size:
            raise ValueError(
                f"LatentStream was built for {self.world_size} process(es), but {torch.distributed.get_world_size()} "
                "now run: build it after the process group starts, or pass rank and world_size"
            )
        if self._taken and workers != self._workers:
            raise ValueError(
                f"epoch {self.epoch} was read by {self._workers} DataLoader worker(s) and is resumed with {workers}: "
                f"each worker streams its own part, so keep num_workers={self._workers} until the epoch ends"
            )
        self._workers = workers
        self._control[1:] = 0
        # DataLoader asks its workers in turn from worker 0: the one whose batch came next plays worker 0's part.
        self._control[1] = self._next if self._taken else 0
        for worker, taken in self._taken.items():
            self._control[2 + worker] = taken

    def _advance(self, worker: int, taken: int, size: int) -> None:
        self._taken[worker] = taken
        self._samples += size
        self._next = (worker + 1) % self._workers

    def _finish(self) -> None:
        self._control[0] += 1
        self._taken, self._samples, self._next = {}, 0, 0

    def loader(self, **dataloader_options: Any) -> StreamLoader:
        """A DataLoader over this stream (`num_workers`, `pin_memory`, `persistent_workers`, `prefetch_factor`...;
        it batches nothing itself) that reports each batch the trainer takes, for `state_dict`."""
        return StreamLoader(self, **dataloader_options)

    # The stream itself, in each worker.
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        reporting = info is not None or self._driven  # else this process iterates it directly, and counts itself
        if not reporting:
            self._begin(1)
        workers = info.num_workers if info is not None else 1
        worker = (info.id + int(self._control[1])) % workers if info is not None else 0
        epoch = int(self._control[0])
        for taken, rows in self._worker_batches(epoch, worker, workers, int(self._control[2 + worker])):
            batch = collate([self._maker.item(row.latents, row.shape, row.index, epoch, row.fields) for row in rows])
            if reporting:
                batch[POSITION] = (worker, taken)
            else:
                self._advance(worker, taken, len(rows))
            yield batch
        if not reporting:
            self._finish()

    def _segments(self, epoch: int, worker: int, workers: int) -> list[tuple[int, int, int]]:
        """(shard, first row, end row) of what this worker of this rank reads in `epoch`, in order."""
        order = np.arange(len(self._files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        ends = np.cumsum(self._rows[order])
        part = int(ends[-1]) // self.world_size if len(ends) else 0
        begin = self.rank * part + worker * part // workers
        end = self.rank * part + (worker + 1) * part // workers
        segments = []
        for i in range(int(np.searchsorted(ends, begin, side="right")), len(order)):
            start = int(ends[i] - self._rows[order[i]])
            if start >= end:
                break
            segments.append((int(order[i]), max(begin, start) - start, min(end, int(ends[i])) - start))
        return [s for s in segments if s[2] > s[1]]

    def _limit(self, workers: int) -> int | None:
        """Under even_batches, the full batches every worker of every rank is sure to fill."""
        if not self.even_batches:
            return None
        part = int(self._offsets[-1]) // self.world_size // workers  # the smallest worker's rows
        return max(0, (part - self._buckets * (self.batch_size - 1)) // self.batch_size)

    def _worker_batches(self, epoch: int, worker: int, workers: int, skip: int) -> Iterator[tuple[int, list[Row]]]:
        """(batches made so far, rows of the next batch), after the first `skip` batches, which are replayed on
        positions and buckets alone."""
        segments = self._segments(epoch, worker, workers)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, workers])
        plan = BatchPlan(self.shuffle_buffer if self.shuffle else 0, self.batch_size, rng)
        limit = self._limit(workers)
        if limit is not None and skip >= limit:
            return
        start, tail = self._replay(plan, segments, skip) if skip else (0, None)
        pending = plan.pending() | {p for batch in tail or [] for p in batch}
        store = dict(self._read(segments, only=pending)) if pending else {}
        made = skip
        if tail is None:
            for position, row in self._read(segments, start=start):
                store[position] = row
                batch = plan.push(position, row.bucket)
                if batch is not None:
                    made += 1
                    yield made, [store.pop(p) for p in batch]
                    if made == limit:
                        return
            tail = plan.finish(self.drop_last)
        for batch in tail:
            made += 1
            yield made, [store.pop(p) for p in batch]
            if made == limit:
                return

    def _replay(self, plan: BatchPlan, segments: list, skip: int) -> tuple[int, list[list[int]] | None]:
        """Run `plan` through the first `skip` batches on the bucket column alone: (next input position, or the
        rest of the final batches when the skipped ones reach into them)."""
        made, position = 0, 0
        for position, row in self._read(segments, columns=["bucket"]):
            if plan.push(position, row.bucket) is not None:
                made += 1
                if made == skip:
                    return position + 1, None
        tail = plan.finish(self.drop_last)
        return position + 1, tail[skip - made :]

    def _read(
        self, segments: list, start: int = 0, only: set[int] | None = None, columns: list[str] | None = None
    ) -> Iterator[tuple[int, Row]]:
        """(input position, row) of the worker's input from `start` on, or only the positions in `only`."""
        columns = columns or self._columns
        step = blocks.chunk_rows(self._item_bytes() if columns is self._columns else 64)
        wanted_all = sorted(only) if only is not None else None
        position = 0
        for shard, first, end in segments:
            size = end - first
            if wanted_all is None:
                lo, hi, keep = max(0, start - position), size, None
            else:  # the positions asked for that lie in this segment
                inside = wanted_all[
                    bisect.bisect_left(wanted_all, position) : bisect.bisect_left(wanted_all, position + size)
                ]
                lo, hi, keep = (
                    (inside[0] - position, inside[-1] - position + 1, {p - position for p in inside})
                    if inside
                    else (0, 0, None)
                )
            if lo < hi:
                rows = blocks.iter_batches(
                    self.location, self._files[shard], first + lo, first + hi, columns, step, int(self._rows[shard])
                )
                for row_number, row in rows_of(rows, first + lo, first + hi, self._maker.latent_columns):
                    offset = row_number - first
                    if keep is None or offset in keep:
                        row.index = int(self._offsets[shard]) + row_number
                        yield position + offset, row
            position += size


def _row_count(entry: dict, location: CacheLocation) -> int:
    rows = entry.get("rows")
    if not isinstance(rows, int) or rows < 0:
        raise CacheError(f"{location.where('manifest.json')}: shard {entry['file']} has no row count; write it again")
    return rows


class StreamLoader:
    """A DataLoader over a `LatentStream` that reports to it each batch the trainer takes (`stream.loader()`)."""

    def __init__(self, stream: LatentStream, **options: Any) -> None:
        refused = sorted(
            {"batch_size", "batch_sampler", "sampler", "shuffle", "collate_fn", "drop_last"} & set(options)
        )
        if refused:
            raise TypeError(f"{refused}: the stream batches, shuffles and collates itself (pass them to LatentStream)")
        self.stream = stream
        self.dataloader = torch.utils.data.DataLoader(stream, batch_size=None, **options)

    def __iter__(self) -> Iterator[dict]:
        self.stream._begin(max(1, self.dataloader.num_workers))
        self.stream._driven = True
        try:
            for batch in self.dataloader:
                worker, taken = batch.pop(POSITION)
                self.stream._advance(int(worker), int(taken), len(batch["key"]))
                yield batch
        finally:
            self.stream._driven = False
        self.stream._finish()
