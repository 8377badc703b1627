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
output.py      the output folder: replacing an earlier benchmark, cleaning up after a failed or killed run
grids.py       comparison grids; plots.py: the plots
"""

from __future__ import annotations

import logging

import torch

from codec.bench import output
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

    refusal = output.prepare(options.output) if group.rank == 0 else None
    refusals = [r for r in group.gather(refusal) if r]  # every rank stops alike, or the others would wait forever
    if refusals:
        raise BenchError(refusals[0])
    try:  # no rank writes a reconstruction before the old ones are out of the way (the gather above waited)
        shards = run_and_gather(options, group, device, quiet=group.rank != 0)
        if group.rank != 0:
            return None
        summary = report.summarize(shards, options, str(device), group.world)
        summary["grids"] = grids.write_grids(summary, options.output, options.grid_images)
        summary["plots"] = plots.write_plots(summary, options.output)
        report.write(summary, options.output)
    except BaseException:
        if group.rank == 0:
            output.abandon(options.output)
        raise
    output.finish(options.output)
    log.info("wrote %s", options.output)
    return summary
