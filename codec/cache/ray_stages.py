"""What Ray's workers run for `codec cache --engine ray`: input shards read, decoded and cropped (CPU tasks), and
batches encoded by actors that load the model once (codec.cache.ray_engine builds the pipeline and writes parts).

Rows pass between the stages as plain columns (ints, strings, bytes), so no stage depends on how Ray would type
Python objects: the pixels and latents as raw bytes, the crop geometry as JSON, the carried columns as one Arrow
record batch in the source's own schema (so they reach the part exactly as the default engine writes them). Each
input also sends a row that marks its end (or the reason it could not be read), so the driver knows its length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from codec.cache.input_plan import Work
from codec.cache.preprocess import Prepared, Preprocessing
from codec.cache.writer import NOT_FINITE, _encode
from codec.sources import SourceError, decode_image

ITEM, END, FAILED = "", "end", "failed"  # the `marker` column
CHUNK = 16  # items a decoding task yields at a time: Ray's blocks stream instead of waiting for a whole input
PASSED = ("slot", "position", "marker", "key", "reason", "carried", "geometry")  # through the encoder unchanged


def encode_carried(carried: dict, schema) -> bytes:
    import pyarrow as pa

    return pa.RecordBatch.from_pylist([carried], schema=schema).serialize().to_pybytes()


def decode_carried(data: bytes, schema) -> dict:
    import pyarrow as pa

    return pa.ipc.read_record_batch(pa.py_buffer(data), schema).to_pylist()[0]


def geometry_of(prepared: Prepared) -> str:
    return json.dumps(
        {
            "bucket": list(prepared.bucket),
            "original_size": list(prepared.original_size),
            "crop_box": list(prepared.crop_box),
            "crop_top_left": list(prepared.crop_top_left),
        }
    )


class _Columns:
    """Rows collected column by column, taken as one batch."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in (*PASSED, "pixels")}

    def __len__(self) -> int:
        return len(self.columns["slot"])

    def add(self, slot: int, position: int, marker: str = ITEM, key: str = "", reason: str = "", **rest) -> None:
        values = {"slot": slot, "position": position, "marker": marker, "key": key, "reason": reason}
        values.update({"carried": b"", "geometry": "", "pixels": b""}, **rest)
        for name, column in self.columns.items():
            column.append(values[name])

    def take(self) -> dict[str, list]:
        taken, self.columns = self.columns, {name: [] for name in self.columns}
        return taken


def _add_sample(rows: _Columns, slot: int, position: int, sample, preprocessing: Preprocessing, schema) -> None:
    carried = encode_carried(sample.carried, schema)
    if sample.image is None:
        rows.add(slot, position, key=sample.key, reason=sample.problem, carried=carried)
        return
    try:
        prepared = preprocessing(decode_image(sample.image, preprocessing.max_pixels))
    except Exception as error:  # one bad image must not end a run over millions: report it, go on
        rows.add(slot, position, key=sample.key, reason=str(error) or type(error).__name__, carried=carried)
        return
    pixels = prepared.pixels.contiguous().numpy().tobytes()
    rows.add(slot, position, key=sample.key, carried=carried, geometry=geometry_of(prepared), pixels=pixels)


def decode_inputs(batch: dict, source, work: list[Work], preprocessing: Preprocessing) -> Iterator[dict]:
    """A Ray Data map_batches function: for each slot (an index into `work`), its input's items from where the
    cache left off, decoded and cropped, then the row that marks its end."""
    schema = source.carried_schema()
    for slot in (int(s) for s in batch["id"]):
        rows, position = _Columns(), work[slot].start
        try:
            for sample in source.samples(work[slot].input, work[slot].start):
                _add_sample(rows, slot, position, sample, preprocessing, schema)
                position += 1
                if len(rows) == CHUNK:
                    yield rows.take()
        except SourceError as error:  # an unreadable input stops the run, as with the default engine
            rows.add(slot, position, FAILED, reason=str(error))
            yield rows.take()
            return
        rows.add(slot, position, END)
        yield rows.take()


@dataclass
class _Pending:
    """What writer._encode reads of an item: its prepared pixels."""

    prepared: Prepared


class Encoder:
    """A Ray Data callable class: an actor that loads the model once (from the object store) and encodes each
    batch's images, per bucket, in batches of at most `batch_size`."""

    def __init__(self, model: list, batch_size: int, flip: bool, compile: bool) -> None:
        import ray

        vae = ray.get(model[0])  # a list, so Ray hands over the reference, not a copy made at submission
        on_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
        if not on_gpu:  # Ray sets one thread; a CPU encoder computes on its node's cores, as the default engine does
            torch.set_num_threads(
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            )
        if compile:
            vae.enable_compile()
        self.vae = vae.to("cuda" if on_gpu else "cpu").eval()
        self.batch_size, self.flip = batch_size, flip

    def __call__(self, batch: dict) -> dict:
        out = {name: list(batch[name]) for name in PASSED}
        latents = [b""] * len(out["slot"])
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, (marker, reason) in enumerate(zip(out["marker"], out["reason"], strict=True)):
            if marker == ITEM and not reason:
                buckets.setdefault(tuple(json.loads(out["geometry"][index])["bucket"]), []).append(index)
        for (height, width), indices in buckets.items():
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first : first + self.batch_size]
                pending = [_Pending(_prepared(batch["pixels"][i], height, width)) for i in chunk]
                for index, encoded in zip(chunk, _encode(self.vae, pending, self.flip), strict=True):
                    if not all(torch.isfinite(t).all() for t in encoded):
                        out["reason"][index] = NOT_FINITE
                        continue
                    latents[index] = torch.stack(encoded).numpy().tobytes()
                    geometry = json.loads(out["geometry"][index])
                    out["geometry"][index] = json.dumps({**geometry, "latent_shape": list(encoded[0].shape)})
        return {**out, "latents": latents}


def _prepared(pixels: bytes, height: int, width: int) -> Prepared:
    array = np.frombuffer(pixels, dtype=np.uint8).reshape(3, height, width)
    return Prepared(torch.from_numpy(array.copy()), (height, width), (0, 0), (0.0, 0.0, 0.0, 0.0), (0, 0))
