"""Reading a shard's latents a few rows at a time, wherever it lies (`CacheLocation`).

`pq.read_table` of a shard's latent columns holds several times their size in Arrow buffers while it decodes;
read `CHUNK_BYTES` of rows at a time, peak memory stays near what is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from codec.cache.location import CacheLocation
from codec.cache.shards import CacheError, latent_arrays

CHUNK_BYTES = 4 << 20  # rows per read: enough to amortise a read call, small next to a worker's memory
READ_BUFFER = 1 << 20  # bytes fsspec or the OS hands pyarrow per read, instead of a whole column chunk


@contextlib.contextmanager
def open_shard(location: CacheLocation, relative: str) -> Iterator[pq.ParquetFile]:
    """A shard's ParquetFile; a missing or damaged file is a CacheError naming it."""
    where = location.where(relative)
    try:
        with location.open(relative) as file:
            yield pq.ParquetFile(file, buffer_size=READ_BUFFER, pre_buffer=False)
    except (OSError, pa.ArrowException) as error:
        raise CacheError(f"{where}: unreadable shard ({error}); check it with `codec cache verify`") from None


def chunk_rows(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def read_block(
    location: CacheLocation, relative: str, row_group: int, names: Sequence[str], sizes: np.ndarray, dtype
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The latent columns `names` of one row group as {name: (offsets, values)}, read into arrays allocated once
    from `sizes` (values per row, known from the shape column)."""
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    values = {name: np.empty(int(offsets[-1]), dtype=dtype) for name in names}
    row = 0
    step = chunk_rows(int(sizes.max(initial=1)) * np.dtype(dtype).itemsize * len(names))
    with open_shard(location, relative) as parquet:
        for batch in parquet.iter_batches(
            batch_size=step, row_groups=[row_group], columns=list(names), use_threads=False
        ):
            end = row + batch.num_rows
            for name in names:
                found, flat = latent_arrays(batch.column(name))
                if end > len(sizes) or found[-1] - found[0] != offsets[end] - offsets[row]:
                    raise CacheError(
                        f"{location.where(relative)}: column {name} does not hold what the shape column says; "
                        "check the cache with `codec cache verify`"
                    )
                values[name][offsets[row] : offsets[end]] = flat[found[0] : found[-1]]
            row = end
    return {name: (offsets, array) for name, array in values.items()}


def iter_batches(
    location: CacheLocation, relative: str, start: int, stop: int, columns: Sequence[str], step: int, rows: int
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, batch) covering rows [start, stop) of a shard that must hold `rows` rows; whole row groups
    before `start` are not read, rows of a row group before it are (Parquet reads no part of a page)."""
    with open_shard(location, relative) as parquet:
        meta = parquet.metadata
        if meta.num_rows != rows:
            raise CacheError(
                f"{location.where(relative)}: {meta.num_rows} rows, but the manifest lists {rows}; the cache changed "
                "while it was read? check it with `codec cache verify`"
            )
        groups, first, row = [], None, 0
        for index in range(meta.num_row_groups):
            size = meta.row_group(index).num_rows
            if row + size > start and row < stop:
                groups.append(index)
                first = row if first is None else first
            row += size
        if not groups:
            return
        for batch in parquet.iter_batches(batch_size=step, row_groups=groups, columns=list(columns), use_threads=False):
            yield first, batch
            first += batch.num_rows
            if first >= stop:
                return
