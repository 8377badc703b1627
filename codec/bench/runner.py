"""One process's share of a benchmark: its images, through every codec, scored; then everything gathered.

Under `accelerate launch` rank r takes images r, r + world, ...; each rank writes its own reference and
reconstruction PNGs and gathers its records, timings and Inception features to every rank (rank 0 reports).
A rank that fails still takes part in the gather, carrying its error, so no other rank waits for it forever.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from codec import metrics
from codec.bench import classic, rate
from codec.bench.baselines import BASELINES, SD_LATENT, LatentCodec, LatentShape, load_codec
from codec.bench.data import BenchItem, open_source
from codec.bench.fid import FIDUnavailable, InceptionFeatures
from codec.bench.foreign import load_foreign_codec
from codec.bench.measure import Meter
from codec.bench.perceptual import NETS, load_lpips
from codec.bench.scoring import REFERENCE, Scorer, load_png, save_png
from codec.foreign import check_supported
from codec.images import tensor_to_uint8

log = logging.getLogger("codec.bench")


class BenchError(ValueError):
    """A benchmark that could not run (on some rank); the message says where and why."""


@dataclass
class BenchOptions:
    models: list[str]
    data: str
    output: Path
    protocol: str = "crop256"
    limit: int | None = None
    latent_precision: str = "fp16"
    classic: tuple[str, ...] = classic.CLASSIC
    lpips: bool = True
    fid: bool = True
    batch_size: int = 8
    dtype: torch.dtype = torch.float32
    split: str = "validation"
    column: str = "image"
    grid_images: int = 2
    rd_qualities: tuple[int, ...] = (5, 10, 20, 35, 50, 70, 85, 95)
    lpips_random_trunk: bool = False  # tests only: plumbing with an untrained trunk, never for reported figures
    command: str = ""


@dataclass
class Group:
    """The processes of a run: rank, world size, and a gather of picklable objects (to every rank)."""

    rank: int = 0
    world: int = 1

    def gather(self, obj: object) -> list:
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])


@dataclass
class Shard:
    """What one rank found: per-image records, per-row facts, Inception features and rate-distortion points."""

    records: list[dict] = field(default_factory=list)
    rows: dict[str, dict] = field(default_factory=dict)
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)
    rd_points: list[dict] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    quiet: bool = False  # no progress bars (ranks other than 0)


def row_name(spec: str, taken: set[str]) -> str:
    if spec in BASELINES or spec == "builtin":
        base = spec
    else:
        base = Path(spec.rstrip("/\\")).name or spec
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", base.replace("preset:", "preset-")).strip("-") or "model"
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base}-{counter}"
    taken.add(name)
    return name


def _batches(items: list[BenchItem], sizes: dict[str, tuple[int, int]], batch_size: int) -> list[list[BenchItem]]:
    """Consecutive images of one size, at most `batch_size` to a batch."""
    batches: list[list[BenchItem]] = []
    for item in items:
        if batches and len(batches[-1]) < batch_size and sizes[batches[-1][0].name] == sizes[item.name]:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _run_latent_codec(
    codec: LatentCodec, items: list[BenchItem], sizes: dict, options: BenchOptions, scorer: Scorer, shard: Shard
) -> None:
    meter = Meter(codec.device)
    batches = _batches(items, sizes, options.batch_size)

    def load(batch: list[BenchItem]) -> tuple[list[np.ndarray], torch.Tensor]:
        arrays = [load_png(scorer.reference_path(item.name)) for item in batch]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        # Plain NCHW: convolution kernels differ by memory layout, and so would the last bits of the results.
        return arrays, x.contiguous().to(codec.device)

    with torch.no_grad():
        if batches:  # warm-up: first-call costs (allocations, kernel selection) are not the codec's speed
            _, x = load(batches[0])
            with meter.memory():
                codec.decode(codec.encode(x), tuple(x.shape[-2:]))
        for batch in tqdm(batches, desc=codec.name, unit="batch", disable=shard.quiet):
            arrays, x = load(batch)
            with meter.memory():
                with meter.time("encode"):
                    stored = codec.encode(x)
                with meter.time("decode"):
                    y = codec.decode(stored, tuple(x.shape[-2:]))
            bits = stored.bits_per_image()
            for item, reference, recon in zip(batch, arrays, tensor_to_uint8(y), strict=True):
                record = scorer.score(codec.name, codec.name, item.name, reference, recon)
                record.update(image=item.name, model=codec.name, kind=codec.kind)
                record.update(width=reference.shape[1], height=reference.shape[0])
                record["bpp"] = rate.bits_per_pixel(bits, *reference.shape[:2])
                shard.records.append(record)
    scorer.flush(codec.name)
    shard.rows[codec.name] = {
        "name": codec.name,
        "kind": codec.kind,
        "spec": codec.spec,
        "description": codec.describe(),
        "params": codec.params,
        "weights_mb": codec.weights_mb,
        "latent_precision": options.latent_precision,
        "seconds": meter.seconds,
        "images": len(items),
        "peak_bytes": meter.peak_bytes,
        "memory_method": meter.method,
    }


def _classic_targets(shard: Shard) -> dict[str, dict]:
    """One target per distinct per-image rate among the learned models: {label: {"bpp": {image: bpp}, "models"}}."""
    by_model: dict[str, dict[str, float]] = {}
    for record in shard.records:
        if record["kind"] == "vae":
            by_model.setdefault(record["model"], {})[record["image"]] = record["bpp"]
    targets: dict[str, dict] = {}
    for model, per_image in by_model.items():
        for target in targets.values():
            if target["bpp"] == per_image:
                target["models"].append(model)
                break
        else:
            targets[model] = {"bpp": per_image, "models": [model]}
    return targets


def _run_classic(codec_name: str, target_key: str, target: dict, items, scorer: Scorer, shard: Shard) -> None:
    name = f"{codec_name}@{target_key}"
    meter = Meter(torch.device("cpu"))
    for item in tqdm(items, desc=name, unit="img", disable=shard.quiet):
        reference = load_png(scorer.reference_path(item.name))
        goal = target["bpp"][item.name]
        found = classic.match_rate(reference, codec_name, goal)  # the search is not timed, only the final coding
        with meter.memory():
            with meter.time("encode"):
                data = classic.encode(reference, codec_name, found.quality)
            with meter.time("decode"):
                recon = classic.decode(data)
        record = scorer.score(name, name, item.name, reference, recon)
        record.update(image=item.name, model=name, kind="classic", width=reference.shape[1], height=reference.shape[0])
        record.update(bpp=found.bpp, target_bpp=goal, quality=found.quality, rate_met=found.met)
        shard.records.append(record)
    scorer.flush(name)
    shard.rows[name] = {
        "name": name,
        "kind": "classic",
        "spec": codec_name,
        "description": f"Pillow {codec_name.upper()}, quality searched per image to fit the rate of {', '.join(target['models'])}",
        "matched_to": target["models"],
        "params": 0,
        "weights_mb": 0.0,
        "latent_precision": "file",
        "seconds": meter.seconds,
        "images": len(items),
        "peak_bytes": meter.peak_bytes,
        "memory_method": meter.method,
    }


def _rd_points(codec_name: str, qualities: tuple[int, ...], items, scorer: Scorer, shard: Shard) -> None:
    """Fixed-quality points for the rate-distortion curves of the PSNR-vs-bpp plot (PSNR only: it is what is drawn)."""
    for item in items:
        reference = load_png(scorer.reference_path(item.name))
        for quality in qualities:
            data = classic.encode(reference, codec_name, quality)
            psnr = float(metrics.psnr(reference, classic.decode(data))[0])
            shard.rd_points.append(
                {"codec": codec_name, "quality": quality, "bpp": classic.bpp_of(data, reference), "psnr": psnr}
            )


def _run_models(options: BenchOptions, items, sizes: dict, scorer: Scorer, shard: Shard, device) -> None:
    """The VAEs, then the baselines at the rate of the VAEs' latents (one row per distinct latent shape, SD's
    where there is no VAE); the rows keep the order the models were given in."""
    taken: set[str] = set()
    planned = [(spec, row_name(spec, taken)) for spec in options.models]
    latents: dict[tuple[int, int], tuple[LatentShape, list[str]]] = {}  # (factor, channels): first, every model
    for spec, name in planned:
        if spec not in BASELINES:
            args = (spec, name, options.latent_precision, device, options.dtype)
            codec = load_foreign_codec(*args) or load_codec(*args)  # another diffusers autoencoder: through diffusers
            _run_latent_codec(codec, items, sizes, options, scorer, shard)
            latents.setdefault((codec.latent.factor, codec.latent.channels), (codec.latent, []))[1].append(name)
            del codec  # free one model's weights before the next is loaded
    matched = list(latents.values()) or [(SD_LATENT, None)]
    order = []
    for spec, name in planned:
        if spec not in BASELINES:
            order.append(name)
            continue
        for latent, models in matched:
            row = name if len(matched) == 1 else f"{name}@{latent.model}"
            codec = load_codec(spec, row, options.latent_precision, device, options.dtype, latent)
            _run_latent_codec(codec, items, sizes, options, scorer, shard)
            shard.rows[row]["matched_to"] = models
            order.append(row)
    shard.rows = {name: shard.rows[name] for name in order}


def run_shard(options: BenchOptions, group: Group, device: torch.device, quiet: bool = False) -> Shard:
    shard = Shard(quiet=quiet)
    from codec.weights import check_spec

    for spec in options.models:  # all of them before any work: a typo in the last would surface hours later
        if spec not in BASELINES:
            check_spec(spec)
            check_supported(spec)  # another diffusers autoencoder's class: one that runs
    items = open_source(options.data, split=options.split, column=options.column)
    if options.limit is not None:
        items = items[: options.limit]
    mine = items[group.rank :: group.world]
    lpips_metrics = []
    if options.lpips:
        for net in NETS:
            metric = load_lpips(net, device, random_trunk=options.lpips_random_trunk)
            if metric.available:
                lpips_metrics.append(metric)
            else:
                shard.notes[f"lpips_{net}"] = metric.reason or "unavailable"
    inception = None
    if options.fid:
        try:
            inception = InceptionFeatures(device)
        except FIDUnavailable as error:
            shard.notes["rfid"] = str(error)
    scorer = Scorer(options.output, lpips_metrics, inception)
    classic_codecs = [name for name in options.classic if classic.available(name)]
    for name in set(options.classic) - set(classic_codecs):
        shard.notes[name] = f"this Pillow has no {name.upper()} support; its rows are left out"
    sizes = {}
    for item in tqdm(mine, desc="references", unit="img", disable=quiet):
        array = item.load(options.protocol)
        sizes[item.name] = array.shape[:2]
        save_png(array, scorer.reference_path(item.name))
        scorer.add_features(REFERENCE, array)
    scorer.flush(REFERENCE)
    _run_models(options, mine, sizes, scorer, shard, device)
    for target_key, target in _classic_targets(shard).items():
        for codec_name in classic_codecs:
            _run_classic(codec_name, target_key, target, mine, scorer, shard)
    for codec_name in classic_codecs:
        _rd_points(codec_name, options.rd_qualities, mine, scorer, shard)
    shard.features = scorer.features
    return shard


def run_and_gather(options: BenchOptions, group: Group, device: torch.device, quiet: bool = False) -> list[Shard]:
    """Every rank's shard, on every rank; raises (on every rank) if any rank failed."""
    try:
        shard = run_shard(options, group, device, quiet=quiet)
    except Exception as error:  # carried to the gather, so the other ranks learn of it instead of hanging
        if group.world == 1:
            raise
        log.exception("rank %d failed", group.rank)
        shard = Shard(error=f"rank {group.rank}: {type(error).__name__}: {error}")
    shards = group.gather(shard)
    errors = [s.error for s in shards if s.error]
    if errors:
        raise BenchError("; ".join(errors))
    return shards
