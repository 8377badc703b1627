"""Tiled encode and decode: any image size in memory bounded by the tile, without visible seams.

Two things make tiles disagree with the untiled result. Convolutions near a tile's edge lack context: tiles
overlap, the outer quarter of each overlap is dropped and the rest blended with linear ramps. GroupNorm
statistics differ per tile (a tile of sky normalises differently from a tile of grass, so whole tiles shift
in tone): passes over two downscaled copies of the input, each small enough to be a single tile, estimate
every norm's per-group mean and variance for the whole input (estimate_norm_stats), and every tile then
normalises with those shared numbers.

The decoder's tail is not tiled but streamed in bands of rows (codec/streaming.py), which needs no overlap;
its first up block runs whole and its output norm's statistics are measured exactly, so only the norms
between come from the passes (codec/inference.py). Tiles remain for the encoder and for latents too large
for one global attention. docs/tiling.md explains the design and its measured fidelity.

Tiles along an axis are made as small as still covers it with the given overlap, not the largest allowed:
1024 pixels in tiles of at most 512 with 64 overlap become 3 tiles of 384, not 3 of 512 (less recomputation).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from codec.groupnorm import GroupNorm, group_stats
from codec.precision import cpu_has_native_bf16

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # keyed by each norm's qualified name


def plan_axis(length: int, max_tile: int, overlap: int, align: int = 1) -> tuple[int, list[int]]:
    """Tile size and start offsets covering [0, length): the fewest tiles of at most `max_tile`, each as small
    as that count allows, neighbours sharing at least `overlap`, sizes and starts multiples of `align`."""
    if length <= max_tile:
        return length, [0]
    count = math.ceil((length - overlap) / (max_tile - overlap))
    tile = min(max_tile, math.ceil(math.ceil((length + (count - 1) * overlap) / count) / align) * align)
    span = length - tile
    starts = sorted({(round(i * span / (count - 1)) // align) * align for i in range(count)})
    starts[-1] = span - span % align
    if starts[-1] + tile < length:  # the last start was rounded down to alignment: one more aligned unit
        tile += align
    return tile, starts


def _edge_weights(length: int, overlap_start: int, overlap_end: int) -> torch.Tensor:
    """Blend weights along one side of a tile, for the overlaps it shares with the previous and next tile.

    Within an overlap the outer quarter gets weight 0 (those pixels lacked context beyond the tile's edge),
    the middle half ramps linearly, and the inner quarter keeps weight 1; the neighbour's weights mirror these.
    """
    weights = torch.ones(length)
    for overlap, flip in ((overlap_start, False), (overlap_end, True)):
        if not overlap:
            continue
        margin = overlap // 4
        ramp = overlap - 2 * margin
        side = torch.cat([torch.zeros(margin), (torch.arange(ramp) + 0.5) / ramp, torch.ones(overlap - margin - ramp)])
        side = side.flip(0) if flip else side
        if flip:
            weights[length - overlap :] = torch.minimum(weights[length - overlap :], side)
        else:
            weights[:overlap] = torch.minimum(weights[:overlap], side)
    return weights


@contextlib.contextmanager
def _norm_hooks(module: nn.Module, hook: Callable) -> Iterator[None]:
    norms = [(name, m) for name, m in module.named_modules() if isinstance(m, GroupNorm)]
    for name, norm in norms:
        # A name, not id(norm): statistics recorded on a model apply to any copy of it.
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
        stats[norm.stats_key] = group_stats(h, norm.num_groups)
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


def estimate_norm_stats(
    module: nn.Module,
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    max_side: int,
    align: int,
    low_precision: bool = True,
    fraction: float = 0.5,
) -> Stats:
    """The whole input's GroupNorm statistics, estimated from two passes over downscaled copies of it.

    A downscaled copy has coarser features than the full input, so its statistics are biased (variances come out
    low). Passes at `fraction` of the input's size and at half that (at most the area of a `max_side` square,
    which bounds their memory) measure how the statistics change per halving, and the change is carried on for
    the log2(1 / fraction) halvings up to full size, linearly for means and in the log for variances.

    With `low_precision`, an fp32 model runs these passes under bf16 autocast where the hardware has fast bf16
    (see `statistics_autocast`): only statistics come out of them, within the extrapolation's own error, in about
    half the time. docs/tiling.md has the measured figures.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    # Sizes are sides of squares of the passes' areas: bounded by its longer side, a thin strip shrank to a pixel
    # or two across.
    size = math.sqrt(x.shape[-2] * x.shape[-1])
    side = min(max_side, max(align, math.ceil(size * fraction / align) * align))
    precision = statistics_autocast(x) if low_precision else contextlib.nullcontext()
    one_pass = side >= size or side // 2 < align  # too small to extrapolate: one whole pass is the answer
    with precision:
        near = record_norm_stats(module, run, downscale_to_fit(x, side, align))
        if one_pass:
            return near
        far = record_norm_stats(module, run, downscale_to_fit(x, side // 2, align))
    halvings = math.log2(1 / fraction)
    estimate: Stats = {}
    for key, (mean, var) in near.items():
        far_mean, far_var = far[key]
        log_var, far_log_var = var.clamp_min(1e-12).log(), far_var.clamp_min(1e-12).log()
        estimate[key] = (mean + halvings * (mean - far_mean), (log_var + halvings * (log_var - far_log_var)).exp())
    return estimate


def statistics_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """bf16 autocast for statistics passes over fp32 `x`, where bf16 is fast on its device; else a no-op.

    Only the statistics, never the output, come from these passes, and group_stats reduces in fp32. A CPU
    without native bf16 (AVX512-BF16 or AMX) would emulate it, slower than fp32, so it keeps fp32.
    """
    if x.dtype != torch.float32:
        return contextlib.nullcontext()
    if x.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if x.device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def downscale_to_fit(x: torch.Tensor, max_side: int, align: int) -> torch.Tensor:
    """Area-downscale `x` to at most the area of a `max_side` square, keeping the aspect ratio and sides aligned
    (at least `align`)."""
    h, w = x.shape[-2:]
    scale = min(1.0, max_side / math.sqrt(h * w))
    if scale == 1.0:
        return x
    short = max(align, round(min(h, w) * scale / align) * align)
    long = max(align, round(max(h, w) * scale / align) * align)
    if short * long > 1.25 * max_side * max_side:
        # The short side was rounded up to a whole `align` (a thin strip): the long side gives the area back, or
        # the pass could cost many tiles' memory. Not for a few percent, as the estimate is sensitive to the
        # passes' ratio.
        long = max(align, min(long, max_side * max_side // short // align * align))
    size = (short, long) if h <= w else (long, short)
    return F.interpolate(x.float(), size=size, mode="area").to(x.dtype)


def tiled_apply(
    module: nn.Module,
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    max_tile: int,
    overlap: int,
    scale: float,
    align: int,
    out_channels: int,
) -> torch.Tensor:
    """Apply `run` (a spatial map from x's grid to a grid `scale` times as large) tile by tile.

    `max_tile` and `overlap` are in input units and multiples of `align`, so every tile's output lands on
    whole output pixels. Statistics are shared across tiles as the module docstring explains.
    """
    b, _, h, w = x.shape
    stats = estimate_norm_stats(module, run, x, max_tile, align)
    out_h, out_w = round(h * scale), round(w * scale)
    out = torch.zeros(b, out_channels, out_h, out_w, dtype=torch.float32, device=x.device)
    total_weight = torch.zeros(1, 1, out_h, out_w, dtype=torch.float32, device=x.device)
    (tile_h, rows), (tile_w, cols) = plan_axis(h, max_tile, overlap, align), plan_axis(w, max_tile, overlap, align)
    with shared_norm_stats(module, stats):
        for top in rows:
            for left in cols:
                piece = x[:, :, top : top + tile_h, left : left + tile_w]
                result = run(piece).float()
                oy, ox = round(top * scale), round(left * scale)
                th, tw = result.shape[-2:]
                fade = round(overlap * scale)
                wy = _edge_weights(th, fade if top > 0 else 0, fade if top + tile_h < h else 0)
                wx = _edge_weights(tw, fade if left > 0 else 0, fade if left + tile_w < w else 0)
                weight = (wy[:, None] * wx[None, :]).to(x.device)
                out[:, :, oy : oy + th, ox : ox + tw] += result * weight
                total_weight[:, :, oy : oy + th, ox : ox + tw] += weight
    return (out / total_weight).to(x.dtype)


def overlap_for(tile: int, align: int) -> int:
    """Overlap between neighbouring tiles: an eighth of the tile, aligned, at least one aligned unit."""
    return max(align, math.ceil(tile / 8 / align) * align)
