"""The streaming reader's parts that know no files: rows as read, and the plan that turns a worker's input positions
into bucket batches through a seeded shuffle buffer.

The plan sees positions and buckets only, never latents, so a resumed worker replays the batches it had made on
the small bucket column alone, then reads just the rows that were still waiting in the buffer or in a bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from codec.cache.items import CONDITIONING
from codec.cache.shards import latent_arrays

_WIDTHS = {"shape": (3, np.int64), "bucket": (2, np.int64), **{name: (w, t) for name, w, t in CONDITIONING}}
_DRAWS = 4096  # buffer slots drawn at a time; fixed, so a replay draws exactly what the first run drew


class Row:
    """One cache row as the streaming reader keeps it: latents as stored (flat, copied out of the read batch)."""

    __slots__ = ("bucket", "fields", "index", "latents", "shape")

    def __init__(self, shape: list[int], bucket: tuple[int, int], latents: dict, fields: dict) -> None:
        self.shape, self.bucket, self.latents, self.fields, self.index = shape, bucket, latents, fields, -1


def _fixed(array: pa.Array, width: int, dtype) -> np.ndarray:
    return np.asarray(array.flatten(), dtype=dtype).reshape(-1, width)


def rows_of(
    batches: Iterable[tuple[int, pa.RecordBatch]], start: int, stop: int, latent_columns: Sequence[str]
) -> Iterator[tuple[int, Row]]:
    """(row number, Row) for rows [start, stop) of record batches given with their first row's number; the fields
    in the order LatentDataset gives them: key, bucket, conditioning, carried columns."""
    for first, batch in batches:
        names = batch.schema.names
        fixed = {name: _fixed(batch.column(name), *_WIDTHS[name]) for name in names if name in _WIDTHS}
        latents = {name: latent_arrays(batch.column(name)) for name in latent_columns if name in names}
        plain = {name: batch.column(name).to_pylist() for name in names if name not in _WIDTHS and name not in latents}
        order = ["bucket", *(name for name, _, _ in CONDITIONING)]
        for i in range(max(start - first, 0), min(batch.num_rows, stop - first)):
            fields = {"key": plain["key"][i]} if "key" in plain else {}
            fields.update({name: fixed[name][i] for name in order if name in fixed})
            fields.update({name: values[i] for name, values in plain.items() if name != "key"})
            stored = {name: values[offsets[i] : offsets[i + 1]].copy() for name, (offsets, values) in latents.items()}
            shape = fixed["shape"][i].tolist() if "shape" in fixed else []
            yield first + i, Row(shape, tuple(fixed["bucket"][i].tolist()), stored, fields)


class BatchPlan:
    """Input positions through a shuffle buffer of `buffer_size` (0 or 1: none), then into one queue per bucket;
    a queue that reaches `batch_size` is a batch. Every random draw comes from `rng`, in a fixed pattern."""

    def __init__(self, buffer_size: int, batch_size: int, rng: np.random.Generator) -> None:
        self.size, self.batch_size, self.rng = buffer_size, batch_size, rng
        self.buffer: list[tuple[int, tuple]] = []
        self.queues: dict[tuple, list[int]] = {}
        self._draws, self._next = np.zeros(0, dtype=np.int64), 0

    def push(self, position: int, bucket: tuple) -> list[int] | None:
        """Take one input; the batch it completes, if any."""
        if self.size <= 1:
            return self._queue(position, bucket)
        if len(self.buffer) < self.size:
            self.buffer.append((position, bucket))
            return None
        if self._next == len(self._draws):
            self._draws, self._next = self.rng.integers(self.size, size=_DRAWS), 0
        slot = int(self._draws[self._next])
        self._next += 1
        leaving, self.buffer[slot] = self.buffer[slot], (position, bucket)
        return self._queue(*leaving)

    def _queue(self, position: int, bucket: tuple) -> list[int] | None:
        queue = self.queues.setdefault(bucket, [])
        queue.append(position)
        if len(queue) < self.batch_size:
            return None
        del self.queues[bucket]
        return queue

    def pending(self) -> set[int]:
        """Positions taken in but in no batch yet."""
        return {p for p, _ in self.buffer} | {p for queue in self.queues.values() for p in queue}

    def finish(self, drop_last: bool) -> list[list[int]]:
        """The input is over: the buffer leaves in a shuffled order, then each bucket's remainder (by bucket)."""
        leaving = [self.buffer[i] for i in self.rng.permutation(len(self.buffer))]
        self.buffer = []
        batches = [batch for item in leaving if (batch := self._queue(*item)) is not None]
        rest = [self.queues[bucket] for bucket in sorted(self.queues)]
        self.queues = {}
        return batches if drop_last else batches + rest
