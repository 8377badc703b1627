"""Tiled encode and decode: any image size in memory bounded by the tile, without visible seams.

Two things make tiles disagree with the untiled result. Convolutions near a tile's edge lack context: tiles
overlap and are blended with linear ramps over the overlap. GroupNorm statistics differ per tile (a tile of
sky normalises differently from a tile of grass, so whole tiles shift in tone): one pass over a downscaled
copy of the input, small enough to be a single tile, records every norm's per-group mean and variance, and
every tile then normalises with those shared numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from codec.groupnorm import GroupNorm, group_moments

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # keyed by each norm's qualified name


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), neighbours sharing `overlap`, starts aligned."""
    if length <= tile:
        return [0]
    stride = max(tile - overlap, align)
    stride -= stride % align
    starts = list(range(0, length - tile, stride))
    last = length - tile
    last -= last % align
    if not starts or starts[-1] != last:
        starts.append(last)
    return starts


def _ramp(length: int, fade_start: int, fade_end: int) -> torch.Tensor:
    """1 in the middle, rising linearly over the first `fade_start` and falling over the last `fade_end` values."""
    weights = torch.ones(length)
    if fade_start:
        weights[:fade_start] = (torch.arange(fade_start) + 0.5) / fade_start
    if fade_end:
        weights[length - fade_end :] = torch.minimum(
            weights[length - fade_end :], ((torch.arange(fade_end) + 0.5) / fade_end).flip(0)
        )
    return weights


@contextlib.contextmanager
def _norm_hooks(module: nn.Module, hook: Callable) -> Iterator[None]:
    norms = [(name, m) for name, m in module.named_modules() if isinstance(m, GroupNorm)]
    for name, norm in norms:
        # A name, not id(norm): an fp32 copy of the model (the half-precision fallback) finds the same entries.
        norm.stats_key = name
        norm.stats_hook = hook
    try:
        yield
    finally:
        for _, norm in norms:
            norm.stats_hook = None


def record_norm_stats(module: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Stats:
    """Run `run(x)` and keep each GroupNorm's per-(sample, group) mean and variance of its input."""
    stats: Stats = {}

    def hook(norm: GroupNorm, h: torch.Tensor) -> None:
        total, total_sq, count = group_moments(h, norm.num_groups)
        mean = total / count
        stats[norm.stats_key] = (mean, (total_sq / count - mean.square()).clamp_min(0.0))
        return None  # normalise with its own statistics, which are the ones recorded

    with _norm_hooks(module, hook):
        run(x)
    return stats


@contextlib.contextmanager
def shared_norm_stats(module: nn.Module, stats: Stats) -> Iterator[None]:
    """Within the block, every GroupNorm of `module` normalises with `stats` instead of its input's own."""

    def hook(norm: GroupNorm, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stats[norm.stats_key]

    with _norm_hooks(module, hook):
        yield


def downscale_to_fit(x: torch.Tensor, max_side: int, align: int) -> torch.Tensor:
    """Area-downscale `x` so that neither side exceeds `max_side`, keeping the aspect ratio and sides aligned."""
    h, w = x.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return x
    size = (max(align, round(h * scale / align) * align), max(align, round(w * scale / align) * align))
    return F.interpolate(x.float(), size=size, mode="area").to(x.dtype)


def tiled_apply(
    module: nn.Module,
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
    align: int,
    out_channels: int,
) -> torch.Tensor:
    """Apply `run` (a spatial map from x's grid to a grid `scale` times as large) tile by tile.

    `tile` and `overlap` are in input units and multiples of `align`, so every tile's output lands on whole
    output pixels. Statistics are shared across tiles as the module docstring explains.
    """
    b, _, h, w = x.shape
    stats = record_norm_stats(module, run, downscale_to_fit(x, tile, align))
    out_h, out_w = round(h * scale), round(w * scale)
    out = torch.zeros(b, out_channels, out_h, out_w, dtype=torch.float32, device=x.device)
    total_weight = torch.zeros(1, 1, out_h, out_w, dtype=torch.float32, device=x.device)
    rows, cols = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    with shared_norm_stats(module, stats):
        for top in rows:
            for left in cols:
                piece = x[:, :, top : top + tile, left : left + tile]
                result = run(piece).float()
                oy, ox = round(top * scale), round(left * scale)
                th, tw = result.shape[-2:]
                fade = round(overlap * scale)
                wy = _ramp(th, fade if top > 0 else 0, fade if top + tile < h else 0)
                wx = _ramp(tw, fade if left > 0 else 0, fade if left + tile < w else 0)
                weight = (wy[:, None] * wx[None, :]).to(x.device)
                out[:, :, oy : oy + th, ox : ox + tw] += result * weight
                total_weight[:, :, oy : oy + th, ox : ox + tw] += weight
    return (out / total_weight).to(x.dtype)


def tile_count(h: int, w: int, tile: int, overlap: int, align: int) -> int:
    return len(tile_starts(h, tile, overlap, align)) * len(tile_starts(w, tile, overlap, align))


def overlap_for(tile: int, align: int) -> int:
    """Overlap between neighbouring tiles: an eighth of the tile, aligned, at least one aligned unit."""
    return max(align, math.ceil(tile / 8 / align) * align)
