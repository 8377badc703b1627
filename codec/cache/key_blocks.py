"""The shards of a cache of listed keys (a folder, a .txt list, a dataset): content-defined blocks of the sorted keys.

A key starts a block when a hash of the key alone is 0 modulo the shard size S (or when the block already holds
2 S keys), so blocks average about S keys and where they begin depends on the keys, not on their positions:
adding or removing a key changes only the block it falls in (and, where a block was cut at 2 S keys, the cut
blocks up to the next hashed start). A block's file is named by its first key, so unchanged blocks keep theirs.
"""

from __future__ import annotations

import hashlib

from codec.cache.shards import DATA_DIR

LAYOUT = "key-blocks"
CAP = 2  # a block holds at most CAP x S keys: a long run of keys without a hashed start is cut there


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def plan_blocks(keys: list[str], size: int) -> list[range]:
    """Positions of `keys` (sorted, unique) in blocks of about `size`, each a range, in key order."""
    starts = []
    for index, key in enumerate(keys):
        if not starts or index - starts[-1] >= CAP * size or _key_hash(key) % size == 0:
            starts.append(index)
    return [range(start, stop) for start, stop in zip(starts, [*starts[1:], len(keys)], strict=True)]


def block_file(first_key: str) -> str:
    """A block's shard file, relative to the cache: named by its first key's hash (stable while that key is)."""
    return f"{DATA_DIR}/shard-{hashlib.sha256(first_key.encode()).hexdigest()[:16]}.parquet"


def is_positional(name: str) -> bool:
    """Whether a shard file name is one of the layout before blocks (shard-00000.parquet: shard i of S keys)."""
    number = name.removeprefix("shard-").removesuffix(".parquet")
    return name.startswith("shard-") and number.isdigit() and len(number) <= 8
