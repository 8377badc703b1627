"""Checksums of a shard's content: one per row, and one for the shard, taken from the Arrow table when the shard
is written and again when `codec cache verify` reads it back.

They are of the values, not of the file's bytes, so that a shard's own footer can hold them (a file cannot hold
its own hash) and verify can say which rows changed. A flipped byte in the data either stops the file from
decoding or changes a value, and so a row's checksum.
"""

from __future__ import annotations

import hashlib
from itertools import pairwise

import numpy as np

from codec.cache.shards import latent_arrays

ROW_CHECKSUM_HEX = 16  # per row in the footer: 64 bits find a changed row; the shard's checksum is full length


def row_digests(table) -> list[bytes]:
    """A sha256 digest per row of every column's value in that row, in schema order."""
    digests = [hashlib.sha256() for _ in range(table.num_rows)]
    for name in table.column_names:
        for digest, value in zip(digests, _row_bytes(table.column(name)), strict=True):
            digest.update(len(value).to_bytes(8, "little") + value)
    return [digest.digest() for digest in digests]


def shard_checksum(digests: list[bytes]) -> str:
    return "sha256:" + hashlib.sha256(b"".join(digests)).hexdigest()


def row_checksums(digests: list[bytes]) -> list[str]:
    return [digest.hex()[:ROW_CHECKSUM_HEX] for digest in digests]


def _row_bytes(column) -> list[bytes]:
    """Each row's value as bytes: raw values for lists of numbers and for binary, repr for anything else."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_binary(kind) or (pa.types.is_list(kind) and pa.types.is_primitive(kind.value_type)):
        offsets, values = latent_arrays(column)
        raw = np.ascontiguousarray(values).view(np.uint8)
        width = values.dtype.itemsize
        return [raw[start * width : stop * width].tobytes() for start, stop in pairwise(offsets.tolist())]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [b"\0" if value is None else value.encode() for value in column.to_pylist()]
    return [repr(value).encode() for value in column.to_pylist()]
