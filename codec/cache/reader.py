"""Reading a latent cache for diffusion training: `LatentDataset` (map-style) and a bucket-aware `BucketBatchSampler`.

    dataset = LatentDataset("cache/", codec=vae)            # or codec="sha256-encoder:..." (manifest codec.identity)
    sampler = BucketBatchSampler(dataset, batch_size=32, seed=0)  # rank and world from torch.distributed
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=LatentDataset.collate, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch); dataset.set_epoch(epoch)
        for batch in loader: batch["latents"]  # (B, C, h, w) scaled, one bucket per batch

The small columns (keys, shapes, buckets, carried columns) of every shard are read up front; latents are read a
block (a shard's row group: the whole shard as `codec cache` writes it) at a time when first needed, and at most
`max_cached_bytes` of them (128 MiB) are kept per process, least recently used first out. BucketBatchSampler then
reads the epoch as many blocks at a time as fit, so each is read about once per epoch per worker. For caches too
large to index up front, or read from object storage, `codec.cache.stream.LatentStream` streams them instead.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from codec.cache.blocks import open_shard, read_block
from codec.cache.items import CONDITIONING, LATENT_NUMPY, META_COLUMNS, ItemMaker, carried_columns, collate, open_cache
from codec.cache.location import CacheLocation
from codec.cache.shards import fixed_width_rows

DEFAULT_CACHED_BYTES = 128 << 20  # per process: 4 DataLoader workers x 128 MiB of latents, plus each one's own


class LatentDataset(torch.utils.data.Dataset):
    """Scaled latents and their columns from a cache written by `codec cache` (a folder, or an fsspec URL such as
    `s3://bucket/cache`, opened with `storage_options`).

    `codec` is the AutoencoderKL the trainer uses (or its identity string); a cache made with other weights is
    refused. Pass `codec=None` only to skip that check deliberately. `posterior="sample"` draws z from N(mean,
    std) with a generator seeded by (seed, epoch, index), so a run is reproducible; "mean" returns the mean. With
    `flip` and a cache made with --flip, each item is the mirrored image's latent with probability 1/2 (same seed).
    Latents are scaled as the codec's config says (taken from `codec` when it is a model, else from the manifest),
    as `AutoencoderKL.scale_latents` and diffusers' pipelines do: `(z - latents_mean) * scaling_factor /
    latents_std` where it has per-channel statistics (`codec stats --channel-stats`, Playground v2.5), else
    `(z - shift_factor) * scaling_factor`. `normalize="scaling"` or `"channel"` chooses one of them explicitly;
    passing `scaling_factor` or `shift_factor` means the second. A FLUX.2 codec's latents come as its pipelines
    make them: 2x2 patches folded into channels, batch-normalised by its statistics (`codec.latent_norm`).

    Memory: each process (each DataLoader worker) keeps the latents of the blocks it read last, up to
    `max_cached_bytes` (at least one block), or `max_cached_shards` blocks when that is given. Only
    `max_cached_bytes=None` without `max_cached_shards` keeps every block read: fast only
    where the cache fits in memory ranks x workers times over.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        codec: Any,
        posterior: str = "sample",
        seed: int = 0,
        flip: bool = True,
        columns: Sequence[str] | str | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        normalize: str | None = None,
        max_cached_shards: int | None = None,
        max_cached_bytes: int | None = DEFAULT_CACHED_BYTES,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.location = CacheLocation(root, storage_options)
        self.root = self.location.name
        self.manifest = open_cache(self.location, codec)
        self._files = [entry["file"] for entry in self.manifest["shards"]]
        self._load_index(columns)
        self._maker = ItemMaker(
            self.manifest, str(self.root), codec, posterior=posterior, seed=seed, flip=flip,
            has_flip="flip_mean" in self._schema.names, scaling_factor=scaling_factor, shift_factor=shift_factor,
            normalize=normalize,
        )  # fmt: skip
        self.posterior, self.seed, self.normalize = posterior, seed, self._maker.normalize
        self.scaling_factor, self.shift_factor = self._maker.scaling_factor, self._maker.shift_factor
        self.has_flip = "flip_mean" in self._schema.names
        self.flip = self._maker.flip
        self.max_cached_shards = self._cache_limit(max_cached_shards, max_cached_bytes)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # shared, so workers see set_epoch

    def _load_index(self, columns: Sequence[str] | str | None) -> None:
        tables, blocks, block_rows = [], [], []
        schema, wanted = pa.schema([]), []
        for number, relative in enumerate(self._files):
            with open_shard(self.location, relative) as parquet:
                schema = parquet.schema_arrow
                wanted = carried_columns(schema.names, columns, self.location.where(relative))
                tables.append(parquet.read(columns=[*META_COLUMNS, *wanted], use_threads=False))
                for group in range(parquet.metadata.num_row_groups):
                    blocks.append((number, group))
                    block_rows.append(parquet.metadata.row_group(group).num_rows)
        self._schema, self.carried_columns = schema, wanted
        self._blocks = blocks
        self._block_start = np.zeros(len(blocks) + 1, dtype=np.int64)
        np.cumsum(block_rows, out=self._block_start[1:])
        self._block_of = np.repeat(np.arange(len(blocks)), block_rows)
        table = pa.concat_tables(tables) if tables else None
        if table is None:
            self.keys, self._shapes, self._buckets, self._carried = [], np.zeros((0, 3), np.int64), np.zeros((0, 2)), {}
            self._meta = {}
        else:
            self.keys = table.column("key").to_pylist()
            self._shapes = fixed_width_rows(table.column("shape"), 3, np.int64)
            self._buckets = fixed_width_rows(table.column("bucket"), 2, np.int64)
            self._meta = {
                name: fixed_width_rows(table.column(name), width, dtype) for name, width, dtype in CONDITIONING
            }
            self._carried = {name: table.column(name).to_pylist() for name in self.carried_columns}
        self._sizes = self._shapes.prod(axis=1)
        self.buckets = sorted({tuple(b) for b in self._buckets.tolist()})
        lookup = {bucket: i for i, bucket in enumerate(self.buckets)}
        self.bucket_ids = np.asarray([lookup[tuple(b)] for b in self._buckets.tolist()], dtype=np.int64)

    def _cache_limit(self, max_shards: int | None, max_bytes: int | None) -> int | None:
        """How many blocks a process keeps: None (all) when they all fit in the budget, so a small cache is
        shuffled across all of it."""
        if max_shards is not None:
            return max(1, max_shards)
        if max_bytes is None or not self._blocks:
            return None
        itemsize = np.dtype(LATENT_NUMPY[self._maker.latent_dtype]).itemsize * len(self._maker.latent_columns)
        block_bytes = np.add.reduceat(self._sizes, self._block_start[:-1]) * itemsize
        fits = max(1, int(max_bytes // max(1, int(block_bytes.max()))))
        return None if fits >= len(self._blocks) else fits

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # workers read their own blocks; do not ship arrays through pickle
        return state

    def _block(self, block: int) -> dict:
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block]
        while self.max_cached_shards is not None and len(self._cache) >= self.max_cached_shards:
            self._cache.popitem(last=False)  # before reading, so the limit holds while the new block is read
        number, group = self._blocks[block]
        sizes = self._sizes[self._block_start[block] : self._block_start[block + 1]]
        dtype = LATENT_NUMPY[self._maker.latent_dtype]
        arrays = read_block(self.location, self._files[number], group, self._maker.latent_columns, sizes, dtype)
        self._cache[block] = arrays
        return arrays

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        block = int(self._block_of[index])
        row = index - int(self._block_start[block])
        arrays = self._block(block)
        latents = {name: values[offsets[row] : offsets[row + 1]] for name, (offsets, values) in arrays.items()}
        fields = {"key": self.keys[index], "bucket": self._buckets[index]}
        fields.update({name: values[index] for name, values in self._meta.items()})
        fields.update({name: values[index] for name, values in self._carried.items()})
        return self._maker.item(latents, self._shapes[index].tolist(), index, int(self._epoch), fields)

    collate = staticmethod(collate)

    def describe(self) -> str:
        return json.dumps({k: self.manifest[k] for k in ("codec", "preprocessing", "counts")}, indent=2)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices from one bucket each, shuffled with (seed, epoch), split across ranks.

    Every rank builds the same list of batches and takes every world-th one. So that all ranks run the same
    number of steps (DDP would hang otherwise), the list is cut to a multiple of the world size with `drop_last`
    (which also drops each bucket's last partial batch), else padded by repeating batches from its start.
    """

    def __init__(
        self,
        buckets: LatentDataset | Sequence[Hashable],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # A dataset that keeps only K blocks (shards, or their row groups) in memory is read K blocks at a time: the
        # epoch visits blocks in a shuffled order, K at once, and shuffles batches only among those, so a block is
        # read about once per epoch per worker instead of at nearly every batch (2 of 8 shards kept: 1335 ms per
        # batch shuffled across all, 60-70 ms in windows; see _window_batches).
        self.window_shards: int | None = None
        if isinstance(buckets, LatentDataset):
            self.bucket_ids = buckets.bucket_ids
            if buckets.max_cached_shards is not None:
                self.window_shards = max(1, buckets.max_cached_shards)
                self._block_of = buckets._block_of
        else:
            labels = {label: i for i, label in enumerate(sorted(set(buckets)))}
            self.bucket_ids = np.asarray([labels[label] for label in buckets], dtype=np.int64)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = (
            world_size if world_size is not None else (torch.distributed.get_world_size() if distributed else 1)
        )
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self._world_from_group = world_size is None
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch, self._skip = 0, 0
        self._memo: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle for `epoch`; `skip`: how many of this rank's batches of the epoch a resumed run already trained
        on, left out of the next pass only (the batches after them, and their items' noise, are unchanged)."""
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.epoch, self._skip = epoch, skip

    def _rank_batches(self) -> list[list[int]]:
        # Built once per epoch: trainers ask len(loader) often, and a million items take a second to batch.
        if self._memo is None or self._memo[0] != self.epoch:
            self._memo = (self.epoch, self._all_batches()[self.rank :: self.world_size])
        return self._memo[1]

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.window_shards is None:
            batches = self._bucket_batches(np.arange(len(self.bucket_ids)), rng)
        else:
            shards = np.unique(self._block_of)
            if self.shuffle:
                rng.shuffle(shards)
            batches, carried = [], {}
            for start in range(0, len(shards), self.window_shards):
                window = np.flatnonzero(np.isin(self._block_of, shards[start : start + self.window_shards]))
                batches += self._window_batches(window, carried, rng)
            # What the last window left over, as the unwindowed batching would treat each bucket's last batch.
            batches += [left.tolist() for left in carried.values() if len(left) and not self.drop_last]
        if self.world_size > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) // self.world_size * self.world_size]
            else:
                total = -(-len(batches) // self.world_size) * self.world_size
                batches = (batches * -(-total // len(batches)))[:total]
        return batches

    def _window_batches(self, items: np.ndarray, carried: dict, rng: np.random.Generator) -> list[list[int]]:
        """Full batches of one window's items: a bucket's remainder (fewer than a batch) is carried on to the next
        window, or many small buckets would never fill a batch. Batches holding carried items come first, while
        the previous window's shards are still cached; the rest are shuffled among themselves."""
        first, rest = [], []
        for bucket in np.unique(self.bucket_ids[items]):
            indices = items[self.bucket_ids[items] == bucket]
            if self.shuffle:
                rng.shuffle(indices)
            earlier = carried.pop(bucket, indices[:0])
            indices = np.concatenate([earlier, indices])
            full = len(indices) // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                (first if start < len(earlier) else rest).append(indices[start : start + self.batch_size].tolist())
            carried[bucket] = indices[full:]
        if self.shuffle:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        return first + rest

    def _bucket_batches(self, items: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """`items` in batches of one bucket each, shuffled (within buckets, then the batches) when asked."""
        batches = []
        for bucket in np.unique(self.bucket_ids[items]):
            indices = items[self.bucket_ids[items] == bucket]
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch.tolist())
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self._world_from_group and distributed and torch.distributed.get_world_size() != self.world_size:
            # Built before the process group: every rank would train on every batch, in step, silently.
            raise ValueError(
                f"BucketBatchSampler was built for {self.world_size} process(es), but {torch.distributed.get_world_size()} "
                "now run: build it after the process group starts (after Accelerator() or init_process_group)"
            )
        batches, skip = self._rank_batches(), self._skip
        self._skip = 0
        yield from batches[skip:]

    def __len__(self) -> int:
        return max(0, len(self._rank_batches()) - self._skip)
