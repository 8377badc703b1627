"""How much activation memory an encode or decode needs, and how much we allow it, to decide on tiling."""

from __future__ import annotations

import math
import os

import torch

from codec.config import AutoencoderKLConfig

# Live activations at the widest point of a level: the block input, the norm output, the conv output and the
# residual sum. A bound, not a model: measured peaks sit below it.
LIVE_TENSORS = 4
CPU_BUDGET_CAP = 1 << 30


def _level_peak(channels: tuple[int, ...], pixels_at_level: list[int], itemsize: int) -> int:
    peak = 0
    for level, pixels in enumerate(pixels_at_level):
        widest = max(channels[max(level - 1, 0)], channels[level])
        peak = max(peak, LIVE_TENSORS * widest * pixels * itemsize)
    return peak


def encode_bytes(config: AutoencoderKLConfig, height: int, width: int, itemsize: int, batch: int = 1) -> int:
    """Activation memory of one no-grad encode of `batch` images of this size."""
    levels = len(config.block_out_channels)
    pixels = [height * width // 4**level for level in range(levels)]
    return batch * _level_peak(config.block_out_channels, pixels, itemsize)


def decode_bytes(config: AutoencoderKLConfig, height: int, width: int, itemsize: int, batch: int = 1) -> int:
    """Activation memory of one no-grad decode of `batch` latents of this (latent) size."""
    channels = tuple(reversed(config.decoder_channels))
    levels = len(channels)
    # At 2**k times the latent size live the upsampled output of block k-1 and the resnets of block k.
    pixels = [height * width * 4**level for level in range(levels)]
    return batch * _level_peak(channels, pixels, itemsize)


def default_budget(device: torch.device) -> int:
    """Bytes an encode or decode may use for activations on `device` before it tiles.

    On CUDA: half of the free memory. On CPU: a quarter of the available memory, at most 1 GiB, because
    tiling costs little there and a smaller working set stays in cache. CODEC_MEMORY_BUDGET_MB overrides both.
    """
    override = os.environ.get("CODEC_MEMORY_BUDGET_MB")
    if override:
        try:
            megabytes = float(override)
        except ValueError:
            megabytes = math.nan
        if not math.isfinite(megabytes) or megabytes <= 0:
            raise ValueError(f"CODEC_MEMORY_BUDGET_MB={override!r}: expected a positive number of megabytes, e.g. 512")
        return int(megabytes * (1 << 20))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return min(CPU_BUDGET_CAP, _available_memory() // 4)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
