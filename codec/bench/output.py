"""The benchmark's output folder: what it writes there, how a rerun replaces an earlier benchmark, and how a failed
or killed run leaves the folder as it found it.

A benchmark owns the names in BENCH_OUTPUTS inside `-o` and nothing else there. While it runs, a RUNNING file marks
those names as its own, so that the next run can tell a killed run's partial outputs (removed) from a user's
folder that happens to be called `reference/` (refused, never written into: a rerun would set it aside and delete
it). An earlier benchmark is set aside in PREVIOUS and comes back if the run fails.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger("codec.bench")

BENCH_OUTPUTS = ("reference", "reconstructions", "grids", "plots", "summary.json", "summary.md", "per_image.csv")
PREVIOUS = ".previous-benchmark"
RUNNING = ".benchmark-running"
CREATED = "created the folder"  # a line of the RUNNING marker


def is_benchmark(folder: Path) -> bool:
    """Whether `folder` holds a finished benchmark (its summary.json, as we write it)."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"rows", "protocol", "images"} <= set(summary)


def written_by_a_benchmark(path: Path, root: Path) -> bool:
    """Whether `path`, found under the data folder `root`, is a benchmark's output (its -o inside the data)."""
    for folder in path.parents:
        if folder == root or not folder.is_relative_to(root):
            return False
        if folder.name == PREVIOUS:
            return True
        if folder.name in BENCH_OUTPUTS and (is_benchmark(folder.parent) or (folder.parent / RUNNING).exists()):
            return True
    return False


def prepare(output: Path) -> str | None:
    """Make `output` ready for a run; returns why it cannot be used, or None. Rank 0 only."""
    if (output / RUNNING).exists():  # a killed run: its outputs are partial, and any earlier benchmark is aside
        log.info("%s: a run was killed here; removing what it wrote", output)
        abandon(output)
    elif (output / PREVIOUS).is_dir() and not is_benchmark(output):  # killed by an older version, mid-way
        abandon(output)
    if is_benchmark(output):
        log.info("%s: replacing the benchmark written there before", output)
        aside = output / PREVIOUS
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in BENCH_OUTPUTS:
            if (output / name).exists():
                (output / name).rename(aside / name)
    foreign = [name for name in BENCH_OUTPUTS if (output / name).exists()]
    if foreign:
        return (
            f"{output}: already holds {', '.join(foreign)}, not from a benchmark; a benchmark writes "
            f"{', '.join(BENCH_OUTPUTS)} there and would mix with (or replace) them: choose another -o"
        )
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    # The marker also says whether this run made the folder: a failed run then takes an empty one away with it.
    (output / RUNNING).write_text("a codec bench run is writing here\n" + (f"{CREATED}\n" if created else ""))
    return None


def finish(output: Path) -> None:
    """After a run that wrote its report: the earlier benchmark and the marker go."""
    shutil.rmtree(output / PREVIOUS, ignore_errors=True)
    (output / RUNNING).unlink(missing_ok=True)


def abandon(output: Path) -> None:
    """After a run that failed or was killed: remove what it wrote and put back the benchmark set aside, if any."""
    aside = output / PREVIOUS
    for name in BENCH_OUTPUTS:
        partial = output / name
        if partial.is_dir():
            shutil.rmtree(partial)
        elif partial.exists():
            partial.unlink()
        if (aside / name).exists():
            (aside / name).rename(partial)
    shutil.rmtree(aside, ignore_errors=True)
    marker = output / RUNNING
    created = marker.is_file() and CREATED in marker.read_text().splitlines()
    marker.unlink(missing_ok=True)
    if created and not any(output.iterdir()):
        output.rmdir()
