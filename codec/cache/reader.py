"""Reading a latent cache for diffusion training: `LatentDataset` and a bucket-aware `BucketBatchSampler`.

    dataset = LatentDataset("cache/", codec=vae)            # or codec="sha256-encoder:..." (manifest codec.identity)
    sampler = BucketBatchSampler(dataset, batch_size=32, seed=0)  # rank and world from torch.distributed
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=LatentDataset.collate, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch); dataset.set_epoch(epoch)
        for batch in loader: batch["latents"]  # (B, C, h, w) scaled, one bucket per batch

The small columns (keys, shapes, buckets, carried columns) of every shard are read up front; latents are read
one shard at a time when first needed and kept (all of them unless `max_cached_shards` bounds it: then
BucketBatchSampler reads the epoch that many shards at a time, so each is read once per epoch).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from codec.cache.identity import identity_of, same_codec
from codec.cache.manifest import read_manifest
from codec.cache.shards import RESERVED_COLUMNS, CacheError, fixed_width_rows, latent_arrays

log = logging.getLogger(__name__)
_META_COLUMNS = ("key", "shape", "bucket", "original_size", "crop_top_left", "crop_box")


class LatentDataset(torch.utils.data.Dataset):
    """Scaled latents and their columns from a cache written by `codec cache`.

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
    """

    def __init__(
        self,
        root: str | Path,
        *,
        codec: Any,
        posterior: str = "sample",
        seed: int = 0,
        flip: bool = True,
        columns: Sequence[str] | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        normalize: str | None = None,
        max_cached_shards: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CacheError(f"{self.root}: no such cache folder")
        if isinstance(columns, str):
            columns = [columns]  # columns="caption" means the one column, not its letters
        manifest = read_manifest(self.root)
        if manifest is None:
            raise CacheError(f"{self.root}: no manifest.json; not a cache written by `codec cache`")
        if not manifest.get("complete"):
            raise CacheError(f"{self.root}: the cache is incomplete (a run was interrupted); run `codec cache` again")
        if posterior not in ("sample", "mean") or normalize not in (None, "scaling", "channel"):
            raise ValueError(
                f"posterior must be 'sample' or 'mean', normalize None, 'scaling' or 'channel'; got {posterior!r}, {normalize!r}"
            )
        info = manifest["codec"]
        if codec is not None and not same_codec(codec, info["identities"].values()):
            raise CacheError(
                f"{self.root}: encoded with codec {info['identity']} ({info['model']}), but the codec given is "
                f"{identity_of(codec)}; latents of other weights would train the diffusion model on the wrong latent space. "
                "Cache the data again with this codec."
            )
        # A model's config wins over the manifest: `codec stats --write-config` may have updated it since.
        config = codec.config if hasattr(codec, "config") else _Obj(info)
        self.scaling_factor = scaling_factor if scaling_factor is not None else config.scaling_factor
        self.shift_factor = (shift_factor if shift_factor is not None else config.shift_factor) or 0.0
        has_statistics = config.latents_mean is not None and config.latents_std is not None
        factors_given = scaling_factor is not None or shift_factor is not None  # asks for (z - shift) * scaling
        asked_normalize = normalize
        normalize = normalize or ("channel" if has_statistics and not factors_given else "scaling")
        self.normalize, self.posterior, self.seed = normalize, posterior, seed
        self._batch_norm = _batch_norm(codec, info, self.root, asked=asked_normalize is not None or factors_given)
        self.max_cached_shards = max_cached_shards
        if normalize == "channel":
            stats = config.latents_mean, config.latents_std
            if stats[0] is None or stats[1] is None:
                raise CacheError(
                    f"{self.root}: normalize='channel' needs latents_mean and latents_std (`codec stats ... --write-config DIR --channel-stats`)"
                )
            self._channel = tuple(torch.tensor(s, dtype=torch.float32).view(-1, 1, 1) for s in stats)
        elif has_statistics:
            log.warning(
                "%s: the codec records per-channel latents_mean/std (`codec stats --channel-stats`), which "
                "normalize='scaling' leaves unused (asked for, or implied by a scaling_factor or shift_factor "
                "given; scaling factor %s); the default applies them",
                self.root,
                self.scaling_factor,
            )
        self.manifest = manifest
        self._files = [self.root / entry["file"] for entry in manifest["shards"]]
        self._load_index(columns)
        self.has_flip = "flip_mean" in self._schema.names
        self.flip = flip and self.has_flip
        self._latent_dtype = manifest["storage"]["latent_dtype"]
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # shared, so workers see set_epoch

    def _load_index(self, columns: Sequence[str] | None) -> None:
        tables = []
        for path in self._files:
            try:
                schema = pq.read_schema(path)
                carried = [n for n in schema.names if n not in RESERVED_COLUMNS]
                wanted = carried if columns is None else list(columns)
                given = [c for c in wanted if c in RESERVED_COLUMNS]
                if given:
                    raise CacheError(
                        f"columns={given}: every item has these already; columns= chooses among the carried "
                        f"columns, here {carried}"
                    )
                unknown = [c for c in wanted if c not in carried]
                if unknown:
                    raise CacheError(f"{path}: no column(s) {unknown}; the cache carries {carried}")
                tables.append(pq.read_table(path, columns=[*_META_COLUMNS, *wanted]))
            except (OSError, pa.ArrowException) as error:
                raise CacheError(f"{path}: unreadable shard ({error}); check it with `codec cache verify`") from None
        self._schema = schema if self._files else pa.schema([])
        self.carried_columns = wanted if self._files else []
        table = pa.concat_tables(tables) if tables else None
        counts = [t.num_rows for t in tables]
        self._shard_of = np.repeat(np.arange(len(counts)), counts)
        self._row_of = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, dtype=np.int64)
        if table is None:
            self.keys, self._shapes, self._buckets, self._carried = [], np.zeros((0, 3)), np.zeros((0, 2)), {}
            self._meta = {}
        else:
            self.keys = table.column("key").to_pylist()
            self._shapes = fixed_width_rows(table.column("shape"), 3, np.int64)
            self._buckets = fixed_width_rows(table.column("bucket"), 2, np.int64)
            self._meta = {
                name: fixed_width_rows(table.column(name), width, dtype)
                for name, width, dtype in (
                    ("original_size", 2, np.int64),
                    ("crop_top_left", 2, np.int64),
                    ("crop_box", 4, np.float32),
                )
            }
            self._carried = {name: table.column(name).to_pylist() for name in self.carried_columns}
        self.buckets = sorted({tuple(b) for b in self._buckets.tolist()})
        lookup = {bucket: i for i, bucket in enumerate(self.buckets)}
        self.bucket_ids = np.asarray([lookup[tuple(b)] for b in self._buckets.tolist()], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # workers read their own shards; do not ship arrays through pickle
        return state

    def _shard(self, shard: int) -> dict:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        # Only the columns this dataset uses: logvar for sampling, the mirrored ones for flips.
        prefixes = ["", "flip_"] if self.flip else [""]
        fields = ["mean", "logvar"] if self.posterior == "sample" else ["mean"]
        names = [prefix + field for prefix in prefixes for field in fields]
        try:
            table = pq.read_table(self._files[shard], columns=names)
        except (OSError, pa.ArrowException) as error:
            raise CacheError(f"{self._files[shard]}: unreadable shard ({error})") from None
        arrays = {name: latent_arrays(table.column(name)) for name in names}
        self._cache[shard] = arrays
        if self.max_cached_shards is not None and len(self._cache) > self.max_cached_shards:
            self._cache.popitem(last=False)
        return arrays

    def _tensor(self, arrays: dict, name: str, row: int, shape) -> torch.Tensor:
        offsets, values = arrays[name]
        flat = torch.from_numpy(values[offsets[row] : offsets[row + 1]].copy())
        if self._latent_dtype == "bf16":
            flat = flat.view(torch.bfloat16)
        return flat.float().reshape(*shape)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        shard, row, shape = int(self._shard_of[index]), int(self._row_of[index]), self._shapes[index].tolist()
        arrays = self._shard(shard)
        seed = int(np.random.SeedSequence([self.seed, int(self._epoch), index]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        flipped = bool(self.flip and torch.rand((), generator=generator) < 0.5)
        prefix = "flip_" if flipped else ""
        z = self._tensor(arrays, prefix + "mean", row, shape)
        if self.posterior == "sample":
            std = torch.exp(0.5 * self._tensor(arrays, prefix + "logvar", row, shape))
            z = z + std * torch.randn(z.shape, generator=generator)
        if self._batch_norm is not None:
            latents = self._batch_norm.normalize(z)  # FLUX.2: patched, then batch-normalised, as its pipelines
        elif self.normalize == "channel":
            latents = (z - self._channel[0]) * self.scaling_factor / self._channel[1]  # as diffusers' SDXL pipelines
        else:
            latents = (z - self.shift_factor) * self.scaling_factor
        item = {
            "latents": latents,
            "key": self.keys[index],
            "bucket": torch.from_numpy(self._buckets[index].copy()),
            "flipped": flipped,
        }
        item.update({name: torch.from_numpy(values[index].copy()) for name, values in self._meta.items()})
        item.update({name: values[index] for name, values in self._carried.items()})
        if flipped and "crop_box" in item:
            _mirror_crop(item)
        return item

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Stack tensors (one bucket per batch, so latents stack), bools to a tensor, anything else to a list."""
        shapes = {tuple(item["latents"].shape) for item in items if "latents" in item}
        if len(shapes) > 1:
            raise CacheError(
                f"a batch mixes latent shapes {sorted(shapes)}: batches must come from BucketBatchSampler as it "
                "made them (do not pass the DataLoader to accelerator.prepare, which splits and pads them again)"
            )
        batch = {}
        for name in items[0]:
            values = [item[name] for item in items]
            if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
                batch[name] = torch.stack(values)
            elif isinstance(values[0], bool):
                batch[name] = torch.tensor(values)
            else:
                batch[name] = values
        return batch

    def describe(self) -> str:
        return json.dumps({k: self.manifest[k] for k in ("codec", "preprocessing", "counts")}, indent=2)


def _batch_norm(codec: Any, info: dict, root: Path, asked: bool):
    """FLUX.2's normalisation of patched latents, from the codec given (a model wins, as for scaling) or else the
    manifest; None for a codec that scales by its config."""
    from codec import latent_norm

    if hasattr(codec, "config"):
        norm = latent_norm.of_model(codec)
    else:
        record = info.get("latent_norm")
        try:
            norm = latent_norm.from_record(record) if record is not None else None
        except ValueError as error:
            raise CacheError(f"{root}: manifest codec.latent_norm: {error}") from None
    if norm is not None and asked:
        raise ValueError(
            f"{root}: this codec normalises its latents by the batch-norm statistics of 2x2 patches (FLUX.2); "
            "normalize, scaling_factor and shift_factor do not apply to it"
        )
    return norm


class _Obj:
    """Attribute access to the manifest's codec section, to read scaling like a model config."""

    def __init__(self, data: dict) -> None:
        self.__dict__.update(data)


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
        # A dataset that keeps only K shards in memory is read K shards at a time: the epoch visits shards in a
        # shuffled order, K at once, and shuffles batches only among those, so a shard is read about once per
        # epoch per worker instead of at nearly every batch (2 of 8 shards kept: 1335 ms per batch shuffled across
        # all, 60-70 ms in windows; see _window_batches).
        self.window_shards: int | None = None
        if isinstance(buckets, LatentDataset):
            self.bucket_ids = buckets.bucket_ids
            if buckets.max_cached_shards is not None:
                self.window_shards = max(1, buckets.max_cached_shards)
                self._shard_of = buckets._shard_of
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
            shards = np.unique(self._shard_of)
            if self.shuffle:
                rng.shuffle(shards)
            batches, carried = [], {}
            for start in range(0, len(shards), self.window_shards):
                window = np.flatnonzero(np.isin(self._shard_of, shards[start : start + self.window_shards]))
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


def _mirror_crop(item: dict) -> None:
    """The crop as it lies in the mirrored image, which is what a flipped latent encodes: SDXL conditions on
    crop_top_left, and a crop's left margin becomes its right one when the image is mirrored."""
    width = float(item["original_size"][1])
    left, top, right, bottom = item["crop_box"].tolist()
    item["crop_box"] = torch.tensor([width - right, top, width - left, bottom], dtype=item["crop_box"].dtype)
    bucket_width = float(item["bucket"][1])
    scale = bucket_width / (right - left)  # original pixels -> pixels of the image resized to cover the bucket
    crop_top, _ = item["crop_top_left"].tolist()
    item["crop_top_left"] = torch.tensor([crop_top, round((width - right) * scale)], dtype=item["crop_top_left"].dtype)
