"""How `codec cache` scales: planning time and peak memory against the number of items, and end-to-end images/s
on tar shards against the model alone.

    .venv/bin/python scripts/bench_plan.py                       # 10^4, 10^5, 10^6 items; tars at 256 px
    .venv/bin/python scripts/bench_plan.py --items 10000 100000 --images 64 --skip-throughput

Planning is measured in a fresh process per point (peak resident memory from getrusage, less that of the same
process before planning), for:
  - a .txt list of N images (the item-planned writer: keys sorted, every file stat-ed for the fingerprints);
  - N items in tar shards of --items-per-shard each (the shard-planned writer: one listing), fresh, and again
    against a complete manifest of a cache of them all (what a rerun plans).
The planner never opens an input, so the shards are empty files of the right names; the list's files do not exist
(a stat that fails costs what one that succeeds does, without 10^6 files on disk).

Throughput writes --images JPEGs (about --size to 1.5x --size) into --shards tars and caches them with the
embedded model (`--model builtin`), against the model alone encoding tensors of the same shape at the same batch
size; best of --repeats interleaved runs after a warm-up. Everything is written under out/bench_plan/; the tables
are printed as Markdown.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package: its sibling's helpers

import torch
from bench_cache import interleaved_best, make_images, model_only_run
from bench_report import command_line, load_average, machine, write_report

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench_plan"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _plan_list(folder: Path, items: int) -> None:
    """What the item-planned writer does before encoding: open the list (keys sorted), fingerprint every shard."""
    from codec.cache.sources import open_source

    source = open_source(folder / f"list-{items}.txt")
    for first in range(0, len(source.keys), 1000):
        source.fingerprint(range(first, min(first + 1000, len(source.keys))))


def _shard_folder(folder: Path, items: int, per_shard: int) -> Path:
    shards = folder / f"shards-{items}"
    if not shards.is_dir():
        shards.mkdir(parents=True)
        for index in range(max(1, items // per_shard)):
            (shards / f"{index:05d}.tar").write_bytes(b"")
    return shards


def _plan_shards(folder: Path, items: int, per_shard: int, rerun: bool) -> None:
    from codec.cache import input_plan
    from codec.cache.locations import Location
    from codec.cache.shard_sources import open_shard_source

    shards = _shard_folder(folder, items, per_shard)
    source = open_shard_source(str(shards))
    recorded = []
    if rerun:  # the manifest of a complete cache: one part per 1000 items of each input
        parts = max(1, per_shard // 1000)
        recorded = [
            {"file": input_plan.part_file(item.name, p), "input": item.name, "part": p, "final": p == parts - 1,
             "fingerprint": item.fingerprint, "first": p * 1000, "count": 1000, "rows": 1000, "skipped": 0}
            for item in source.inputs for p in range(parts)
        ]  # fmt: skip
    plan = input_plan.make_plan(Location(folder / "no-cache"), source.inputs, recorded, True, "h", {})
    assert len(plan.work) == (0 if rerun else len(source.inputs))


def child(argv: list[str]) -> int:
    """One measurement in this fresh process: prints {"seconds", "peak_mb"} as JSON."""
    kind, items, per_shard, folder = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    # The imports are not the planner's cost: pyarrow (footers) and fsspec (listings) are loaded first.
    import pyarrow.parquet  # noqa: F401

    import codec.cache.by_input
    import codec.cache.sources  # noqa: F401
    from codec.cache.locations import filesystem

    filesystem(folder)

    before = _peak_mb()
    start = time.perf_counter()
    if kind == "list":
        _plan_list(folder, items)
    else:
        _plan_shards(folder, items, per_shard, rerun=kind == "shards-rerun")
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": _peak_mb() - before}))
    return 0


def _measure(kind: str, items: int, per_shard: int, folder: Path) -> dict:
    if kind == "list":  # made before timing: writing the list is not planning
        (folder / f"list-{items}.txt").write_text("".join(f"images/{i:09d}.jpg\n" for i in range(items)))
    else:
        _shard_folder(folder, items, per_shard)
    command = [sys.executable, __file__, "--child", kind, str(items), str(per_shard), str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def planning_table(items_list: list[int], per_shard: int) -> str:
    folder = OUT / "plan"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Planning (shards of {per_shard} items; a fresh process per point, peak RSS above the imports)\n",
        "| items | .txt list: s | MB | tar shards, new cache: s | MB | tar shards, rerun: s | MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for items in items_list:
        cells = []
        for kind in ("list", "shards", "shards-rerun"):
            found = _measure(kind, items, per_shard, folder)
            cells += [f"{found['seconds']:.3f}", f"{found['peak_mb']:.1f}"]
        lines.append(f"| {items:,} ({max(1, items // per_shard)} shards) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tars(images: Path, shards: Path, count: int) -> None:
    files = sorted(images.glob("*.jpg"))
    shards.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        with tarfile.open(shards / f"{index:05d}.tar", "w") as tar:
            for path in files[index::count]:
                for name, data in (
                    (path.name, path.read_bytes()),
                    (f"{path.stem}.txt", f"caption {path.stem}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def throughput_table(args: argparse.Namespace) -> str:
    from codec.cache.by_input import build_by_input
    from codec.cache.identity import model_identities
    from codec.cache.preprocess import Preprocessing
    from codec.cache.shard_sources import open_shard_source
    from codec.cache.writer import CacheModel, Settings
    from codec.model import AutoencoderKL

    folder = OUT / f"throughput-{args.images}x{args.size}-{args.shards}"
    images, shards = folder / "images", folder / "shards"
    if not shards.is_dir():
        images.mkdir(parents=True, exist_ok=True)
        make_images(images, args.images, args.size)
        write_tars(images, shards, args.shards)
    vae = AutoencoderKL.load(args.model)
    identities = model_identities(vae)
    vae = vae.eval()
    source = open_shard_source(str(shards / f"{{00000..{args.shards - 1:05d}}}.tar"))
    settings = Settings(Preprocessing(args.size), "fp16", args.batch_size, args.num_workers, 1000, progress=False)

    def end_to_end() -> float:
        with tempfile.TemporaryDirectory(prefix="bench-plan-", dir=folder) as out:
            start = time.perf_counter()
            summary = build_by_input(source, out, CacheModel(vae, identities, args.model), settings)
            assert summary.rows == args.images, summary
            return time.perf_counter() - start

    alone_s, e2e_s = interleaved_best(
        [model_only_run(vae, args.images, args.batch_size, args.size), end_to_end], args.repeats
    )
    alone, e2e = args.images / alone_s, args.images / e2e_s
    return (
        f"Throughput: {args.images} JPEGs in {args.shards} tars, `--model {args.model}` at {args.size} px, "
        f"batch {args.batch_size}, {args.num_workers} decoding workers; best of {args.repeats} after a warm-up\n\n"
        "| model-only img/s | end-to-end img/s (tar shards) | ratio |\n|---|---|---|\n"
        f"| {alone:.2f} | {e2e:.2f} | {e2e / alone:.2f} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--items-per-shard", type=int, default=10_000, help="img2dataset's default")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-planning", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    where = f"{machine(torch.device('cpu'))}, load average {load_average()} at start"
    sections = [f"## codec cache at scale\n\n`{command_line('bench_plan', argv)}`\n\nMachine: {where}."]
    if not args.skip_planning:
        sections.append(planning_table(args.items, args.items_per_shard))
    if not args.skip_throughput:
        sections.append(throughput_table(args))
    write_report(OUT, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
