"""What every benchmark script's report shares: the machine it ran on, Markdown tables, and where it is written.

The scripts write their report to OUT/report.md (under out/ by default) and print it; they never edit
BENCHMARKS.md, which a person curates from such reports.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
from pathlib import Path

import torch

from codec.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("out")
KODAK = ROOT.parent / "shared" / "data" / "kodak"
SAMPLE = ROOT / "codec" / "assets" / "samples" / "astronaut.png"


def default_photos(numbers: tuple[int, ...]) -> list[Path]:
    """The Kodak photos with these numbers where the suite lies beside the repository, else a bundled sample."""
    kodak = [KODAK / f"kodim{n:02d}.png" for n in numbers]
    return [p for p in kodak if p.is_file()] or [SAMPLE]


def machine(device: torch.device) -> str:
    """The processor (with its vector instructions: they decide bf16's speed), cores, threads and torch."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    name = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as cpuinfo:
        name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    from codec.precision import cpu_has_native_bf16

    isa = torch.backends.cpu.get_cpu_capability() + (", native bf16" if cpu_has_native_bf16() else ", no native bf16")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({isa}), {cores} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load_average() -> str:
    """The 1-minute load average: other people's work on a shared machine, which slows every timing."""
    path = Path("/proc/loadavg")
    return path.read_text().split()[0] if path.is_file() else "unknown"


def command_line(script: str, argv: list[str]) -> str:
    return f"python scripts/{script}.py {shlex.join(argv)}".strip()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, sections: list[str]) -> Path:
    """Join the sections into OUT/report.md (atomically), print them, and return the file's path."""
    text = "\n\n".join(section.strip() for section in sections if section.strip()) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    atomic_write_text(path, text)
    print(text, end="")
    print(f"\nreport written to {path}")
    return path
