"""Latent caches for diffusion training: images encoded once into Parquet shards, read back by `LatentDataset`.

    codec cache SRC -o OUT --model M        # write (resumable; under `accelerate launch` ranks split the shards)
    codec cache verify OUT                  # counts, identity, readability
    codec stats OUT --write-config M        # per-channel latent statistics and the scaling factor

Modules: sources (what is read), preprocess (crops and buckets), identity (the codec's hash), shards (the format),
manifest, checksums (of shard rows), writer (the run), verify, reader (LatentDataset, BucketBatchSampler), stream
(LatentStream), stats. Importing this package is light: the names below load their modules (and pyarrow) on first
use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LatentDataset": "codec.cache.reader",
    "BucketBatchSampler": "codec.cache.reader",
    "LatentStream": "codec.cache.stream",
    "CacheError": "codec.cache.shards",
    "model_identity": "codec.cache.identity",
    "model_identities": "codec.cache.identity",
    "verify_cache": "codec.cache.verify",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
