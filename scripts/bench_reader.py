"""Peak memory per DataLoader worker while a large latent cache is read in shuffled bucket batches.

    python scripts/bench_reader.py                                    # 2 GiB cache, 4 workers, every mode
    python scripts/bench_reader.py --size-gb 0.01 --modes bounded     # quick look
    python scripts/bench_reader.py --cache out/bench_reader/cache --keep   # build once, measure again

Modes: `none` (the same DataLoader, sampler and batches, with random latents in place of reading any: what a
worker takes without the reader), `all` (LatentDataset keeping every block it reads: the reader's behaviour before it was bounded, and its
default then, so this script run against that code measures it too), `bounded` (LatentDataset's default budget),
`stream` (LatentStream). Each mode runs in a fresh interpreter with `--workers` DataLoader workers for one epoch (or
`--max-batches`); a thread samples every worker's /proc every 0.2 s: peak RSS (VmHWM, which counts the pages a
forked worker shares with its parent) and peak private memory (Private_Clean + Private_Dirty, what it adds).

The cache is synthetic but in the real format, written with the cache's own shard and manifest functions:
random fp16 latents of --shape in three buckets of about the same area, mean and logvar, no flips. It is built
under the output folder and deleted afterwards unless --keep. Writes OUT/report.md and OUT/results.json and
prints the Markdown. A mode stops early (and says so) if the machine's available memory falls under --min-free-gb.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

MODES = ("none", "all", "bounded", "stream")
FORK = "fork"  # as DataLoader starts workers by default on Linux (before Python 3.14): pages shared with the reader


def build_synthetic_cache(folder: Path, size_bytes: int, shape: tuple[int, int, int], shard_size: int) -> dict:
    """A cache of about `size_bytes` of latents (mean + logvar, fp16) in the real format; its summary."""
    import codec
    from codec.cache import manifest, shards

    channels, height, width = shape
    area = height * width
    # Three buckets of about the same area (latent sides), as aspect buckets are; the first is --shape itself.
    latent_shapes = [(channels, height, width), (channels, height - height // 8, area // (height - height // 8))]
    latent_shapes.append((channels, latent_shapes[1][2], latent_shapes[1][1]))
    row_bytes = 2 * channels * area * 2
    rows = math.ceil(size_bytes / row_bytes)
    rng = np.random.default_rng(0)
    pool = rng.standard_normal(1 << 22).astype(np.float16)  # rows are random slices of it: quick to make
    keys = [f"{i:09d}" for i in range(rows)]
    source = SimpleNamespace(keys=keys, descriptor=lambda: {"kind": "synthetic"})
    prep = {"resolution": height * 8, "buckets": True, "bucket_list": [[s[1] * 8, s[2] * 8] for s in latent_shapes]}
    compat = shards.compat_record("sha256-encoder:synthetic", prep, "fp16", "fp32", shard_size, source.descriptor())
    chash = shards.compat_hash(compat)
    metas = []
    for index in range(math.ceil(rows / shard_size)):
        batch = []
        for key in keys[index * shard_size : (index + 1) * shard_size]:
            c, h, w = latent_shapes[int(rng.integers(3))]
            start = int(rng.integers(0, len(pool) - c * h * w))
            mean = torch.from_numpy(pool[start : start + c * h * w]).view(c, h, w)
            row = shards.Row(key, mean, mean, (h * 8, w * 8), (h * 8, w * 8), (0, 0), (0.0, 0.0, w * 8.0, h * 8.0))
            batch.append(row)
        table = shards.rows_to_table(batch, "fp16", False, [])
        meta = {"shard": index, "compat": chash, "record": compat, "fingerprint": "synthetic", "count": len(batch)}
        meta.update({"rows": len(batch), "skipped": [], "upscaled": 0, "written_by": 0})
        shards.write_shard(folder, index, table, meta)
        metas.append(meta)
    config = codec.preset("sd")
    vae = SimpleNamespace(config=config)
    settings = SimpleNamespace(latent_dtype="fp16", shard_size=shard_size)
    identities = {"float32": "sha256-encoder:synthetic"}
    args = (vae, identities, "synthetic", source, settings, compat, chash, len(metas))
    manifest.write_manifest(folder, manifest.build_manifest(*args, metas=metas))
    on_disk = sum(f.stat().st_size for f in (folder / shards.DATA_DIR).glob("*.parquet"))
    return {"rows": rows, "shards": len(metas), "latent_bytes": rows * row_bytes, "bytes_on_disk": on_disk}


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM from /proc/PID/status, Private_* from smaps_rollup, in KiB (empty once it has exited)."""
    values = {}
    try:
        for name in ("status", "smaps_rollup"):
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                field, _, rest = line.partition(":")
                if field in ("VmRSS", "VmHWM", "Private_Clean", "Private_Dirty"):
                    values[field] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return values


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


class Meter(threading.Thread):
    """Samples this process's DataLoader workers until stopped; flags low memory in `short`."""

    def __init__(self, min_free: int) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, dict[str, int]] = {}
        self.first: dict[int, tuple[int, int]] = {}  # (RSS, private) when first seen
        self.min_free, self.short, self.done = min_free, False, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for pid in _children(os.getpid()):
                values = _status(pid)
                if not values:
                    continue
                private = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
                self.first.setdefault(pid, (values.get("VmRSS", 0), private))
                peak = self.peaks.setdefault(pid, {"hwm": 0, "private": 0})
                peak["hwm"] = max(peak["hwm"], values.get("VmHWM", 0))
                peak["private"] = max(peak["private"], private)
            if _available_bytes() < self.min_free:
                self.short = True


def _no_latents_class():
    import codec

    class NoLatents(codec.LatentDataset):
        """The index, sampler and batches of a LatentDataset, with random latents of each item's shape instead."""

        def __getitem__(self, index: int) -> dict:
            shape = self._shapes[index].tolist()
            return {
                "latents": torch.randn(shape),
                "key": self.keys[index],
                "bucket": torch.from_numpy(self._buckets[index]),
            }

    return NoLatents


def _loader(mode: str, cache: str, workers: int, batch_size: int):
    import codec

    if mode == "none":
        dataset = _no_latents_class()(cache, codec=None, seed=0)
        sampler = codec.BucketBatchSampler(dataset, batch_size=batch_size, seed=0)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=workers,
            multiprocessing_context=FORK,
        )
        return loader, dataset
    if mode == "stream":
        stream = codec.LatentStream(cache, codec=None, batch_size=batch_size, seed=0)
        return stream.loader(num_workers=workers, multiprocessing_context=FORK), stream
    options = {}
    if "max_cached_bytes" in inspect.signature(codec.LatentDataset).parameters and mode == "all":
        options["max_cached_bytes"] = None  # keep every block: what the reader did by default before
    dataset = codec.LatentDataset(cache, codec=None, seed=0, **options)
    sampler = codec.BucketBatchSampler(dataset, batch_size=batch_size, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=codec.LatentDataset.collate,
        num_workers=workers,
        multiprocessing_context=FORK,
    )
    return loader, dataset


def read_once(
    mode: str, cache: str, workers: int, batch_size: int, max_batches: int, min_free: int, freeze: bool
) -> dict:
    """One mode in this (fresh) process: its figures."""
    torch.set_num_threads(1)
    loader, reader = _loader(mode, cache, workers, batch_size)
    if freeze:  # the parent's objects out of the collector's reach: a worker's collections copy none of its pages
        gc.freeze()
    kept = getattr(reader, "max_cached_shards", None)
    meter = Meter(min_free)
    meter.start()
    started, batches, items = time.perf_counter(), 0, 0
    for batch in loader:
        batches += 1
        items += len(batch["key"])
        if batches == max_batches or meter.short:
            break
    seconds = time.perf_counter() - started
    time.sleep(0.5)  # one more sample before the workers go
    meter.done.set()
    meter.join()
    del loader
    seen = sorted(meter.peaks)
    return {
        "mode": mode,
        "blocks_kept": {"all": "all", "none": "0", "stream": "-"}.get(mode, kept or "all (fits)"),
        "batches": batches,
        "items": items,
        "seconds": round(seconds, 1),
        "stopped_for_memory": meter.short,
        "worker_peak_rss_mib": [round(meter.peaks[p]["hwm"] / 1024) for p in seen],
        "worker_peak_private_mib": [round(meter.peaks[p]["private"] / 1024) for p in seen],
        "worker_first_rss_mib": [round(meter.first[p][0] / 1024) for p in seen],
        "worker_first_private_mib": [round(meter.first[p][1] / 1024) for p in seen],
        "main_peak_rss_mib": round(_status(os.getpid()).get("VmHWM", 0) / 1024),  # ru_maxrss outlives exec
    }


def measure(mode: str, args: argparse.Namespace, cache: Path) -> dict:
    """`read_once` in a fresh interpreter (this script run with --read-one), so no mode inherits another's memory."""
    options = [str(cache), str(args.workers), str(args.batch_size), str(args.max_batches), str(args.min_free_gb)]
    options.append("freeze" if args.gc_freeze else "-")
    command = [sys.executable, str(Path(__file__).resolve()), "--read-one", mode, *options]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"reading in mode {mode} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], summary: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Cache: {summary['rows']} rows in {summary['shards']} shards, {summary['latent_bytes'] / 2**30:.2f} GiB of "
        f"latents ({summary['bytes_on_disk'] / 2**30:.2f} GiB on disk), latents {'x'.join(map(str, args.shape))} fp16 "
        f"in 3 buckets; {args.workers} workers, shuffled bucket batches of {args.batch_size}.",
        "",
        "| reader | blocks kept per worker | batches | s | worker peak RSS MiB (max) | worker peak private MiB (max) | "
        "worker RSS / private at start MiB | main process peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stopped = " (stopped: memory short)" if r["stopped_for_memory"] else ""
        lines.append(
            f"| {r['mode']}{stopped} | {r['blocks_kept']} | {r['batches']} | {r['seconds']} | "
            f"{max(r['worker_peak_rss_mib'], default=0)} | {max(r['worker_peak_private_mib'], default=0)} | "
            f"{min(r['worker_first_rss_mib'], default=0)} / {min(r['worker_first_private_mib'], default=0)} | "
            f"{r['main_peak_rss_mib']} |"
        )
    cpu = platform.processor() or platform.machine()
    lines += ["", f"`{command}`; {cpu}, {os.cpu_count()} cores, torch {torch.__version__}."]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_reader"))
    parser.add_argument("--cache", type=Path, help="cache folder (default OUT/cache; built if it has no manifest)")
    parser.add_argument("--keep", action="store_true", help="keep the cache afterwards")
    parser.add_argument("--size-gb", type=float, default=2.0, help="GiB of latents in the synthetic cache")
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 128, 128], help="latent C H W of the first bucket")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batches", type=int, default=0, help="stop each mode after this many (0: one epoch)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--min-free-gb", type=float, default=3.0)
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() before the workers start, so that a worker's garbage collection copies none of the "
        "parent's pages (the spread of the 'none' baseline, 20-190 MiB private, does not come from it)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--read-one"]:  # the child process of `measure`
        mode, cache, workers, batch_size, max_batches, min_free_gb, freeze = argv[1:]
        numbers = int(workers), int(batch_size), int(max_batches), int(float(min_free_gb) * 2**30)
        result = read_once(mode, cache, *numbers, freeze == "freeze")
        print(json.dumps(result))
        return 0
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or args.out / "cache"
    built = not (cache / "manifest.json").is_file()
    try:
        if built:
            cache.mkdir(parents=True, exist_ok=True)
            summary = build_synthetic_cache(cache, int(args.size_gb * 2**30), tuple(args.shape), args.shard_size)
        else:
            manifest = json.loads((cache / "manifest.json").read_text())
            on_disk = sum(f.stat().st_size for f in (cache / "data").glob("*.parquet"))
            rows = manifest["counts"]["rows"]
            summary = {"rows": rows, "shards": len(manifest["shards"]), "bytes_on_disk": on_disk}
            summary["latent_bytes"] = rows * 2 * int(np.prod(args.shape)) * 2
        results = [measure(mode, args, cache) for mode in args.modes]
    finally:
        if built and not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    command = "python scripts/bench_reader.py " + shlex.join(argv)
    report = markdown(results, summary, args, command.strip())
    (args.out / "report.md").write_text(report)
    (args.out / "results.json").write_text(json.dumps({"cache": summary, "results": results}, indent=2) + "\n")
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
