"""images/s of `codec cache`'s two engines on the same WebDataset tar shards: the default one and `--engine ray`.

    .venv/bin/python scripts/bench_engines.py                          # 128 JPEGs in 4 tars, builtin model, 256 px
    .venv/bin/python scripts/bench_engines.py --images 512 --shards 8 --encoders 1 --decoders 2

Both engines cache the same tars to a fresh folder each run, with the same model, size and batch; a local Ray is
started once (its start is reported apart) and each Ray run starts its own pool of encoder actors, as a
command does. Best of --repeats interleaved runs after a warm-up round. The report is printed as Markdown and
written to OUT/report.md (--out, default out/bench_engines), with the shards and images made for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package: its siblings' helpers

import torch
from bench_cache import interleaved_best, make_images
from bench_plan import write_tars
from bench_report import DEFAULT_OUT, command_line, load_average, machine, markdown_table, write_report


def _shards(args: argparse.Namespace) -> Path:
    folder = args.out / f"{args.images}x{args.size}-{args.shards}"
    images, shards = folder / "images", folder / "shards"
    if not shards.is_dir():
        images.mkdir(parents=True, exist_ok=True)
        make_images(images, args.images, args.size)
        write_tars(images, shards, args.shards)
    return shards


def _runs(args: argparse.Namespace, shards: Path) -> list:
    from codec.cache.by_input import build_by_input
    from codec.cache.identity import model_identities
    from codec.cache.preprocess import Preprocessing
    from codec.cache.ray_engine import RayOptions, build_with_ray
    from codec.cache.shard_sources import open_shard_source
    from codec.cache.writer import CacheModel, Settings
    from codec.model import AutoencoderKL

    vae = AutoencoderKL.load(args.model)
    model = CacheModel(vae, model_identities(vae), args.model)
    vae.eval()
    source = open_shard_source(str(shards))
    settings = Settings(Preprocessing(args.size), "fp16", args.batch_size, args.num_workers, 1000, progress=False)
    options = RayOptions(encoders=args.encoders, decoders=args.decoders)

    def timed(build, *extra):
        def run() -> float:
            with tempfile.TemporaryDirectory(prefix="bench-engines-", dir=args.out) as out:
                start = time.perf_counter()
                summary = build(source, out, model, settings, *extra)
                assert summary.rows == args.images, summary
                return time.perf_counter() - start

        return run

    return [timed(build_by_input), timed(build_with_ray, options)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=1, help="the default engine's decoding workers")
    parser.add_argument("--encoders", type=int, default=None, help="Ray's encoder actors (default: the engine's)")
    parser.add_argument(
        "--decoders", type=int, default=None, help="Ray's decoding tasks at once (default: the engine's)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "bench_engines")
    args = parser.parse_args(argv)
    import ray

    shards = _shards(args)
    where = f"{machine(torch.device('cpu'))}, load average {load_average()} at start"
    started = time.perf_counter()
    ray.init(num_cpus=_cpus(), include_dashboard=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - started
    try:
        default_s, ray_s = interleaved_best(_runs(args, shards), args.repeats)
    finally:
        ray.shutdown()
    setup = (
        f"`{command_line('bench_engines', argv)}` on {where}. {args.images} JPEGs ({args.size} to 1.5x{args.size} "
        f"px) in {args.shards} tars, `--model {args.model}` at {args.size} px, batch {args.batch_size}. Default "
        f"engine: {args.num_workers} decoding worker(s). Ray: local, {_cpus()} CPUs, started once in {ray_start:.1f} s "
        f"(not counted); encoders {args.encoders or 'default'}, decoders {args.decoders or 'default'}; each run starts "
        f"its actors. Best of {args.repeats} interleaved runs after a warm-up."
    )
    table = markdown_table(
        ["engine", "s", "img/s"],
        [["default", f"{default_s:.2f}", f"{args.images / default_s:.2f}"],
         ["ray", f"{ray_s:.2f}", f"{args.images / ray_s:.2f}"]],
    )  # fmt: skip
    write_report(args.out, ["## codec cache: the default engine and --engine ray on tar shards", setup, table])
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
