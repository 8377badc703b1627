"""`codec bench`: codecs side by side with the SD VAE model cards' metrics, their rate, speed and memory.

data.py        sources (folder, .txt list, image, `datasets`) and protocols (crop256, full)
rate.py        latent storage precisions and bits per pixel
baselines.py   the VAE and the bicubic pseudo-models under one interface
classic.py     JPEG and WebP at a matched rate
measure.py     time and peak memory
perceptual.py  LPIPS, or 'unavailable'
fid.py         Inception features and the Fréchet distance
scoring.py     per-image metrics
runner.py      one process's share, and the gather
report.py      summary.json, summary.md, per_image.csv
grids.py       comparison grids; plots.py: the plots
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from codec.bench.data import BENCH_OUTPUTS, PREVIOUS
from codec.bench.runner import BenchError, BenchOptions, Group, run_and_gather

log = logging.getLogger("codec.bench")

__all__ = ["BenchError", "BenchOptions", "bench"]


def bench(options: BenchOptions, device: torch.device | None = None) -> dict | None:
    """Run a benchmark and write its outputs under `options.output`; returns the summary on the main process.

    Launched with several processes (`accelerate launch`, torchrun), the ranks split the images; the launch must
    form a real process group (codec.distributed refuses one that did not). `device` applies to a single process;
    under a launch each rank uses the device Accelerate gives it.
    """
    from codec.distributed import launched_world_size

    if launched_world_size() > 1:
        from codec.distributed import DistributedSetupError, make_accelerator, shutdown

        try:
            accelerator = make_accelerator()
        except DistributedSetupError as error:  # a launch whose ranks would each run alone: refuse, plainly
            raise BenchError(str(error)) from error
        try:
            group = Group(accelerator.process_index, accelerator.num_processes)
            return _bench(options, group, accelerator.device)
        finally:
            shutdown(accelerator)
    return _bench(options, Group(), device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _bench(options: BenchOptions, group: Group, device: torch.device) -> dict | None:
    from codec.bench import grids, plots, report

    there_before: set[str] = set()
    if group.rank == 0:
        _set_previous_benchmark_aside(options.output)
        there_before = {name for name in BENCH_OUTPUTS if (options.output / name).exists()}
    group.barrier()  # no rank writes a reconstruction before the old ones are out of the way
    options.output.mkdir(parents=True, exist_ok=True)
    try:
        shards = run_and_gather(options, group, device, quiet=group.rank != 0)
        if group.rank != 0:
            return None
        summary = report.summarize(shards, options, str(device), group.world)
        summary["grids"] = grids.write_grids(summary, options.output, options.grid_images)
        summary["plots"] = plots.write_plots(summary, options.output)
        report.write(summary, options.output)
    except BaseException:
        if group.rank == 0:
            _restore_previous_benchmark(options.output, keep=there_before)
        raise
    shutil.rmtree(options.output / PREVIOUS, ignore_errors=True)
    log.info("wrote %s", options.output)
    return summary


def _is_benchmark(output: Path) -> bool:
    try:
        summary = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"rows", "protocol", "images"} <= set(summary)


def _set_previous_benchmark_aside(output: Path) -> None:
    """A rerun into the same folder replaces the earlier benchmark: its reconstructions and grids of models not in
    this run would otherwise sit beside the new ones as if they belonged to it. They wait in PREVIOUS until this
    run has written its report, and come back if it fails (a mistyped --model must not cost the old results)."""
    if (output / PREVIOUS).is_dir() and not _is_benchmark(output):
        log.info("%s: a run was killed here; putting back the benchmark it had set aside", output)
        _restore_previous_benchmark(output, keep=set())
    if not _is_benchmark(output):
        return
    log.info("%s: replacing the benchmark written there before", output)
    aside = output / PREVIOUS
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for name in BENCH_OUTPUTS:
        if (output / name).exists():
            (output / name).rename(aside / name)


def _restore_previous_benchmark(output: Path, keep: set[str]) -> None:
    """After a failed run: remove what it wrote (the names in BENCH_OUTPUTS, but those in `keep`, which were there
    before it and were not a benchmark's) and put back the benchmark set aside, if any."""
    aside = output / PREVIOUS
    for name in BENCH_OUTPUTS:
        partial = output / name
        if name in keep:
            continue
        if partial.is_dir():
            shutil.rmtree(partial)
        elif partial.exists():
            partial.unlink()
        if (aside / name).exists():
            (aside / name).rename(partial)
    shutil.rmtree(aside, ignore_errors=True)
