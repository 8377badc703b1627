"""Wall-clock time and peak memory of one codec's encode and decode, and nothing else.

GPU: `torch.cuda.max_memory_allocated` over the measured span, minus what was allocated when it began.
CPU (Linux): the peak resident set size over the span minus the RSS when it began. The kernel's peak (VmHWM)
is reset at the start through /proc/self/clear_refs, after glibc's `malloc_trim` returns freed memory, so the
figure covers this span only. Elsewhere: the growth of `resource.getrusage().ru_maxrss`, a lower bound (it moves
only when the process exceeds its earlier peak). `method` says which one produced a figure.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _malloc_trim() -> None:
    # Not glibc: nothing to trim, and the measurement is just coarser.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes, Linux KiB


class Meter:
    """Accumulates seconds per phase and the peak memory over every measured span of one codec."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.peak_bytes = 0
        if self.device.type == "cuda":
            self.method = "CUDA max_memory_allocated during encode+decode, minus the memory allocated before"
        elif _reset_peak_rss():
            self.method = "peak RSS during encode+decode minus RSS before (Linux VmHWM reset via /proc/self/clear_refs)"
        else:
            self.method = "growth of resource.getrusage ru_maxrss (a lower bound)"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def memory(self) -> Iterator[None]:
        """Peak memory of the enclosed work above what was in use when it started."""
        if self.device.type == "cuda":
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            yield
            self._sync()
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device) - before)
        elif "VmHWM" in self.method:
            _malloc_trim()
            before = _status_kib("VmRSS") or 0
            _reset_peak_rss()
            yield
            peak = _status_kib("VmHWM") or before
            self.peak_bytes = max(self.peak_bytes, (peak - before) * 1024)
        else:
            before = _maxrss_kib()
            yield
            self.peak_bytes = max(self.peak_bytes, (_maxrss_kib() - before) * 1024)

    @contextlib.contextmanager
    def time(self, phase: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
