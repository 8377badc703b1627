"""`codec cache --engine ray`: input shards encoded by a Ray Data pipeline, on this machine or a cluster.

The plan, the parts and the manifest are the default engine's (codec.cache.by_input): this process plans which
input shards are new or unfinished, Ray runs the work, and this process publishes each part whole, in order, with
the default engine's own part writer, then writes the manifest. So a cache begun by one engine is finished by the
other, and nothing in it says which wrote it. The pipeline: one CPU task per input shard reads, decodes and crops
(codec.cache.ray_stages.decode_inputs); a pool of actors encodes, each holding the model (GPU actors where the
cluster has GPUs); encoded rows stream back here, where they are put together into parts. Ray retries a task
that dies and restarts an actor that dies; a killed run resumes from the parts already published.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from codec.cache import by_input, ray_stages, shards
from codec.cache.identity import DTYPE_NAMES
from codec.cache.input_plan import Work
from codec.cache.locations import Location
from codec.cache.writer import CacheModel, Group, Settings, Summary

if TYPE_CHECKING:
    from codec.cache.shard_sources import ShardSource

log = logging.getLogger(__name__)
# A decoding worker's heap (torch and codec loaded, the block it builds). Declared, it also keeps decoding in tasks
# of its own: Ray Data fuses a task stage into the actor stage after it when their resources match.
DECODER_MEMORY = 512 << 20
INSTALL = "--engine ray needs Ray, which is not installed: pip install 'latent-codec[ray]'"


@dataclass
class RayOptions:
    """Where and how wide the pipeline runs; None: chosen from the cluster's resources."""

    address: str | None = None  # a running cluster ('auto': the one this machine belongs to); None: start one here
    gpus_per_encoder: float | None = None
    encoders: int | None = None
    decoders: int | None = None
    compile: bool = False


def import_ray():
    """Ray and Ray Data, or a one-line error saying how to install them."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError(INSTALL) from None
    return ray


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def ray_session(ray, address: str | None, progress: bool):
    """Ray joined at `address`, or started on this machine (and stopped after); one already running is used
    as it is. Ray Data's progress bars follow `progress`."""
    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address, logging_level=logging.WARNING)
    elif started:
        ray.init(num_cpus=_cpus(), include_dashboard=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = progress
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        if started:
            ray.shutdown()


@dataclass
class _Resources:
    encoders: int
    gpus_per_encoder: float
    decoders: int | None
    compile: bool = False


def _resources(ray, options: RayOptions) -> _Resources:
    """The encoder pool and decoder limit, refusing what the cluster cannot hold (Ray would wait forever)."""
    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0), int(total.get("CPU", 1))
    per = options.gpus_per_encoder if options.gpus_per_encoder is not None else (1.0 if gpus else 0.0)
    if per < 0 or (options.encoders is not None and options.encoders < 1):
        raise ValueError("--gpus-per-encoder must be 0 or more and --encoders at least 1")
    if options.decoders is not None and options.decoders < 1:
        raise ValueError(f"--decoders must be at least 1, got {options.decoders}")
    if per:
        encoders = options.encoders or max(1, int(gpus // per))
        if encoders * per > gpus:
            raise ValueError(
                f"{encoders} encoder(s) of {per:g} GPU each need {encoders * per:g} GPUs; the Ray cluster has {gpus:g}"
            )
        return _Resources(encoders, per, options.decoders, options.compile)
    encoders = options.encoders or 1
    if encoders >= cpus:
        raise ValueError(f"{encoders} CPU encoder(s) leave none of the Ray cluster's {cpus} CPUs for decoding")
    return _Resources(encoders, 0.0, options.decoders, options.compile)


def _pipeline(ray, source: ShardSource, work: list[Work], settings: Settings, model_ref, found: _Resources, encoder):
    """Rows of every input in `work`, decoded by CPU tasks (one per input) and encoded by the actor pool."""
    slots = ray.data.range(len(work), override_num_blocks=len(work))
    decoded = slots.map_batches(
        ray_stages.decode_inputs, batch_size=1, num_cpus=1, memory=DECODER_MEMORY,
        fn_kwargs={"source": source, "work": work, "preprocessing": settings.preprocessing},
        compute=ray.data.TaskPoolStrategy(size=found.decoders),
    )  # fmt: skip
    # Actor pools default to max_restarts=-1 and max_task_retries=-1: a dead encoder is restarted, its batch rerun.
    return decoded.map_batches(
        encoder, batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=found.encoders),
        num_gpus=found.gpus_per_encoder or None, num_cpus=1,
        fn_constructor_kwargs={
            "model": [model_ref], "batch_size": settings.batch_size, "flip": settings.preprocessing.flip,
            "compile": found.compile,
        },
    )  # fmt: skip


@dataclass
class _Input:
    """One input's rows as they arrive (any order, a retried task's twice), its length once its end is seen."""

    work: Work
    end: int | None = None
    rows: dict[int, dict] = field(default_factory=dict)  # by position in the input
    counts: dict[int, int] = field(default_factory=dict)  # rows per part, by part index counted from work.part
    last: int = -1  # highest position seen
    published: int = 0  # parts published, counted from work.part

    def add(self, row: dict, shard_size: int) -> None:
        position = row["position"]
        if row["marker"] == ray_stages.END:
            self.end = position
        elif position not in self.rows:
            self.rows[position] = row
            index = (position - self.work.start) // shard_size
            self.counts[index] = self.counts.get(index, 0) + 1
            self.last = max(self.last, position)

    def ready(self, shard_size: int) -> tuple[int, bool] | None:
        """(items, final) of the next part to publish once all its rows are here; None until then."""
        first = self.work.start + self.published * shard_size
        have = self.counts.get(self.published, 0)
        if self.end is not None:
            if self.published and first >= self.end:
                return None  # every part published
            items = min(shard_size, self.end - first)
            return (items, first + shard_size >= self.end) if have == items else None
        # A full part is final only if nothing follows: published once a later item shows it is not the last.
        return (shard_size, False) if have == shard_size and self.last >= first + shard_size else None

    def done(self, shard_size: int) -> bool:
        return self.end is not None and self.published > 0 and self.work.start + self.published * shard_size >= self.end


def _row(record: dict, flip: bool, schema) -> shards.Row:
    geometry = json.loads(record["geometry"])
    latents = np.frombuffer(record["latents"], dtype=np.float32).reshape(-1, *geometry["latent_shape"])
    latents = torch.from_numpy(latents.copy())
    row = shards.Row(
        record["key"], latents[0], latents[1], tuple(geometry["bucket"]), tuple(geometry["original_size"]),
        tuple(geometry["crop_top_left"]), tuple(geometry["crop_box"]),
    )  # fmt: skip
    row.carried = ray_stages.decode_carried(record["carried"], schema)
    if flip:
        row.flip_mean, row.flip_logvar = latents[2], latents[3]
    return row


class _Writer:
    """Encoded rows put together into parts, each published whole, in order within its input, by the default
    engine's part writer (so the footer, checksums and entry are the same)."""

    def __init__(self, location: Location, context: dict, work: list[Work], on_part_written) -> None:
        self.location, self.context, self.on_part_written = location, context, on_part_written
        self.inputs = [_Input(item) for item in work]
        self.shard_size = context["settings"].shard_size
        self.schema = context["source"].carried_schema()
        self.entries: list[dict] = []
        self.skipped: list[dict] = []

    def add(self, record: dict) -> None:
        if record["marker"] == ray_stages.FAILED:
            raise shards.CacheError(record["reason"])
        state = self.inputs[record["slot"]]
        state.add(record, self.shard_size)
        while (ready := state.ready(self.shard_size)) is not None:
            self._publish(state, *ready)

    def _publish(self, state: _Input, items: int, final: bool) -> None:
        settings, first = self.context["settings"], state.work.start + state.published * self.shard_size
        part = by_input._Part(state.work, state.work.part + state.published, first)
        for position in range(first, first + items):
            record = state.rows.pop(position)
            part.seen += 1
            if record["reason"]:
                part.skip(by_input._Item(record["slot"], record["key"], None, {}, record["reason"]))
            else:
                part.rows.append(_row(record, settings.preprocessing.flip, self.schema))
        compat = (self.context["compat"], self.context["compat_hash"])
        entry, lines = part.finish(self.location, self.context["source"], None, settings, compat, final, 0)
        state.published += 1
        self.entries.append(entry)
        self.skipped.extend(lines)
        if self.on_part_written is not None:
            self.on_part_written(entry)

    def unfinished(self) -> list[str]:
        return [state.work.input.name for state in self.inputs if not state.done(self.shard_size)]


def _encode_with_ray(
    ray, location: Location, context: dict, work: list[Work], options: RayOptions, on_part_written, encoder
):
    """Run the pipeline over `work`, publishing parts as they complete; returns their entries and skipped images."""
    found = _resources(ray, options)
    log.info(
        "encoding %d input shard(s) with %d encoder(s) (%g GPU each), decoders: %s",
        len(work), found.encoders, found.gpus_per_encoder, found.decoders or "as many as CPUs allow",
    )  # fmt: skip
    model_ref = ray.put(context["model"].vae)  # held here for the run: a restarted encoder loads it again
    writer = _Writer(location, context, work, on_part_written)
    dataset = _pipeline(ray, context["source"], work, context["settings"], model_ref, found, encoder)
    rows = iter(dataset.iter_rows())
    try:
        for record in rows:
            writer.add(record)
    finally:
        if hasattr(rows, "close"):  # stops the pipeline's tasks and actors at once when this run stops early
            rows.close()
    missing = writer.unfinished()
    if missing:  # every input sends its end: one missing is a pipeline that stopped short
        raise shards.CacheError(f"{len(missing)} input(s) unfinished when the pipeline ended (first: {missing[0]})")
    return writer.entries, writer.skipped


def _context(source: ShardSource, model: CacheModel, settings: Settings) -> dict:
    """What by_input's planner, part writer and manifest read: the same record as the default engine's."""
    vae = model.vae
    compat = shards.compat_record(
        model.identities["float32"], settings.preprocessing.to_dict(), settings.latent_dtype,
        DTYPE_NAMES.get(vae.dtype, str(vae.dtype)), settings.shard_size, {**source.descriptor(), "layout": by_input.LAYOUT},
    )  # fmt: skip
    return {
        "source": source, "model": model, "settings": settings, "compat": compat,
        "compat_hash": shards.compat_hash(compat),
    }  # fmt: skip


def build_with_ray(
    source: ShardSource,
    out: str,
    model: CacheModel,
    settings: Settings,
    options: RayOptions | None = None,
    *,
    on_part_written: Callable[[dict], None] | None = None,
    encoder: type = ray_stages.Encoder,
) -> Summary:
    """Encode every input shard of `source` not already cached in `out` (a path or fsspec URL) on Ray; the cache
    is the one build_by_input writes. `model.vae` is sent to the encoders as it is (dtype included); each moves
    it to its GPU where Ray gives it one. Ray is started only when there is something to encode."""
    started = time.perf_counter()
    ray = import_ray()
    options = options or RayOptions()
    settings.check(source, model.vae)
    context = _context(source, model, settings)
    location = Location(out)
    plan = by_input._plan(location, context, Group())
    entries, skipped = [], []
    if plan.work:
        with ray_session(ray, options.address, settings.progress):
            entries, skipped = _encode_with_ray(ray, location, context, plan.work, options, on_part_written, encoder)
    found = by_input._finish(location, context, plan, entries, skipped)
    counts = found["counts"]
    return Summary(
        counts["images"], counts["rows"], counts["skipped"], counts["shards"], reused=len(plan.kept),
        written=len(entries), upscaled=sum(e.get("upscaled") or 0 for e in found["shards"]),
        seconds=time.perf_counter() - started,
    )  # fmt: skip
