"""Throughput of `codec cache`: end-to-end images/s (decode + crop in DataLoader workers, encode, write Parquet)
against the model alone encoding tensors of the same shape at the same batch size. The goal is a ratio >= 0.9:
decoding should hide behind encoding.

    python scripts/bench_cache.py --model preset:tiny --images 64 --size 256 --batch-size 16
    python scripts/bench_cache.py --source ../shared/data/kodak --model my-vae   # real photos

Without --source, N images are generated (JPEG, slightly larger than --size and of varied aspect, so every one is
resized and cropped). Each figure is the best of --repeats timed runs after one untimed warm-up run. The table,
the exact command and the machine (CPU model, cores, load average) go to OUT/report.md and are printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from bench_report import DEFAULT_OUT, command_line, load_average, machine, markdown_table, write_report
from PIL import Image

from codec.cache.identity import model_identities
from codec.cache.preprocess import Preprocessing
from codec.cache.sources import open_source
from codec.cache.writer import CacheModel, Settings, build_cache
from codec.cli.common import DTYPES, resolve_device
from codec.model import AutoencoderKL


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        width, height = int(size * rng.uniform(1.0, 1.5)), int(size * rng.uniform(1.0, 1.25))
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, index * 4 % 256)], axis=2)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)


def model_only_run(vae, count: int, batch: int, size: int):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    @torch.no_grad()
    def run() -> float:
        start = time.perf_counter()
        for done in range(0, count, batch):
            posterior = vae.encode(x[: min(batch, count - done)].to(vae.device)).latent_dist
            posterior.mean.float().cpu(), posterior.logvar.float().cpu()  # what the cache does with them
        return time.perf_counter() - start

    return run


def end_to_end_run(vae, identities, source_dir: Path, args: argparse.Namespace, rows: list[int]):
    source = open_source(source_dir)
    settings = Settings(
        Preprocessing(args.size), args.latent_dtype, args.batch_size, args.num_workers, args.shard_size, progress=False
    )

    def run() -> float:
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as out:
            start = time.perf_counter()
            summary = build_cache(source, out, CacheModel(vae, identities, args.model), settings)
            seconds = time.perf_counter() - start
        rows.append(summary.rows)
        return seconds

    return run


def interleaved_best(runs: list, repeats: int) -> list[float]:
    """Best time of each run over `repeats` rounds, the runs alternating so that a machine shared with others
    slows them alike; one untimed warm-up round first (allocator, oneDNN kernels, imports)."""
    for run in runs:
        run()
    times = [[run() for run in runs] for _ in range(repeats)]
    return [min(column) for column in zip(*times, strict=True)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:tiny")
    parser.add_argument("--source", type=Path, help="an image folder (default: generate --images images)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="crop side (the cache's --resolution)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--latent-dtype", default="fp16")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "bench_cache", help="folder for report.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # Before the runs: the load average is other people's work, not ours.
    where_run = f"{machine(resolve_device(args.device))}, load average {load_average()} at start"
    vae = AutoencoderKL.load(args.model)
    identities = model_identities(vae)
    vae = vae.to(resolve_device(args.device), DTYPES[args.dtype]).eval()
    with tempfile.TemporaryDirectory(prefix="bench-images-") as generated:
        source = args.source
        if source is None:
            source = Path(generated)
            make_images(source, args.images, args.size)
        rows: list[int] = []
        count = len(open_source(source).keys)
        runs = [
            model_only_run(vae, count, args.batch_size, args.size),
            end_to_end_run(vae, identities, source, args, rows),
        ]
        model_seconds, seconds = interleaved_best(runs, args.repeats)
    if rows[-1] != count:
        print(f"warning: {count - rows[-1]} images were skipped as unreadable; end-to-end counts all {count}")
    e2e, alone = count / seconds, count / model_seconds
    where = (
        f"{count} images from {args.source}"
        if args.source
        else f"{count} generated JPEGs (about {args.size}-{args.size * 3 // 2} px)"
    )
    header = ["model", "device, dtype", "batch", "workers", "model-only img/s", "end-to-end img/s", "ratio"]
    row = [args.model, f"{vae.device.type}, {args.dtype}", str(args.batch_size), str(args.num_workers)]
    row += [f"{alone:.1f}", f"{e2e:.1f}", f"{e2e / alone:.2f}"]
    sections = [
        f"## codec cache throughput, {args.model} at {args.size} px ({date.today().isoformat()})",
        f"`{command_line('bench_cache', argv)}` on {where_run}. Data: {where}; best of {args.repeats} "
        "interleaved runs after a warm-up.",
        markdown_table(header, [row]),
    ]
    write_report(args.out, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
