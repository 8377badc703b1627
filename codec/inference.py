"""What `AutoencoderKL.encode`/`decode` do around the network: input checks, padding to the downsampling
factor, batch slicing and tiling within a memory budget, the fp32 retry for half-precision overflow, and fp32
compute for half-precision weights on a CPU that would emulate them (codec.precision).

With gradients enabled (training) only the checks and padding apply: tiling and slicing are inference tools,
and a training step must see exactly the network it optimises. A frozen VAE on an input without gradient (a
diffusion trainer encoding under autograd) has nothing to differentiate, so it takes the inference path.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from codec import latent_norm, memory, precision, streaming, tiling
from codec.groupnorm import GroupNorm
from codec.layers import preferred_memory_format

if TYPE_CHECKING:
    from codec.model import AutoencoderKL

log = logging.getLogger(__name__)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_TILE_LATENT = 16
# Up to this many latent positions (a 1024x1024 image at f8) the mid block's attention runs over the whole
# image even when tiling; beyond, its quadratic cost dominates and it runs per tile, as in diffusers.
GLOBAL_ATTENTION_MAX_TOKENS = 128 * 128
# Tiled decode's statistics passes run at this fraction of the first up block's output and at half that
# (see _decode_tiled for what other fractions measured).
STATS_FRACTION = 3 / 8


class _Fp32Fallback:
    """Recompute a half-precision result that came out non-finite with the model's fp32 copy (codec.precision:
    made once per model, its weights refreshed at each use)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        self._fp32: torch.nn.Module | None = None
        self.fallbacks = 0  # stages recomputed so far

    def __call__(self, run: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        y = run(self.vae, x)
        if y.dtype not in HALF_DTYPES or torch.isfinite(y).all() or not torch.isfinite(x).all():
            return y  # (a non-finite input gives a non-finite output at any precision: nothing to recompute)
        if self._fp32 is None:
            log.warning("%s result was not finite; recomputing in float32 (force_upcast)", y.dtype)
            self._fp32 = precision.fp32_copy(self.vae)
        self.fallbacks += 1
        # Tiling may have installed shared-statistics hooks on the original's norms: the copy uses them for this
        # recomputation only (the copy is shared, see codec.precision).
        pairs = [
            (s, t) for s, t in zip(self.vae.modules(), self._fp32.modules(), strict=True) if isinstance(s, GroupNorm)
        ]
        for source, target in pairs:
            target.stats_hook, target.stats_key = source.stats_hook, getattr(source, "stats_key", None)
        try:
            return run(self._fp32, x.float()).to(y.dtype)
        finally:
            for _, target in pairs:
                target.stats_hook = None


def _check_input(x: torch.Tensor, channels: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must have shape (batch, {channels}, height, width), got {tuple(x.shape)}")
    if not x.is_floating_point():  # a uint8 image's 0..255 would silently be read as if in [-1, 1]
        raise TypeError(
            f"{what} must be floating point, got {x.dtype}; images go in as floats in [-1, 1] "
            "(codec.images.image_to_tensor, or x.float() / 127.5 - 1 for uint8)"
        )
    if x.shape[-2] == 0 or x.shape[-1] == 0 or x.shape[0] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(x.shape)}")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom and right up to a multiple: reflected where the image is large enough, else replicated."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _budget(vae) -> int:
    budget = vae.memory_budget
    if budget is None:
        return memory.default_budget(vae.device)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or budget <= 0:
        raise ValueError(
            f"memory_budget must be a positive number of bytes (float('inf') never tiles) or None, got {budget!r}"
        )
    return sys.maxsize if math.isinf(budget) else int(budget)  # 5e6 is as good a number of bytes as 5_000_000


def _largest_tile(cost: Callable[[int], int], budget: int, limit: int, align: int) -> int:
    """Largest aligned square tile side (input units, at most `limit`) whose cost fits the budget."""
    side = max(align, limit - limit % align)
    while side > align and cost(side) > budget:
        side = max(align, (side * 3 // 4) // align * align)
    return side


def _tile_size(vae, cost: Callable[[int, int], int], budget: int, h: int, w: int, unit: int) -> int:
    if vae.tile_latent_size:
        return vae.tile_latent_size * unit
    tile = _largest_tile(lambda side: cost(side, side), budget, max(h, w), unit)
    return max(tile, MIN_TILE_LATENT * unit)


def _encode_tiled(vae, x: torch.Tensor, tile: int, guarded: _Fp32Fallback) -> torch.Tensor:
    f = vae.config.downsample_factor
    overlap = tiling.overlap_for(tile, f)
    if (x.shape[-2] // f) * (x.shape[-1] // f) > GLOBAL_ATTENTION_MAX_TOKENS:
        # Too many positions for one global attention: the whole encoder runs per tile, attention included.
        run_all = functools.partial(guarded, lambda m, t: m.encode_moments(t))
        return tiling.tiled_apply(vae, run_all, x, tile, overlap, 1 / f, f, 2 * vae.config.latent_channels)
    # Tile only the convolutional part; the mid block's attention then sees the whole image, as untiled.
    run_head = functools.partial(guarded, lambda m, t: m.encoder.forward_head(t))
    channels = vae.config.block_out_channels[-1]
    features = tiling.tiled_apply(vae.encoder, run_head, x, tile, overlap, 1 / f, f, channels)
    return guarded(lambda m, t: m.encode_tail(t), features)


def _decode_tiled(vae, z: torch.Tensor, tile: int, guarded: _Fp32Fallback) -> torch.Tensor:
    if z.shape[-2] * z.shape[-1] > GLOBAL_ATTENTION_MAX_TOKENS:
        run_all = functools.partial(guarded, lambda m, t: m.decode_raw(t))
        f, overlap = vae.config.downsample_factor, tiling.overlap_for(tile, 1)
        return tiling.tiled_apply(vae, run_all, z, tile, overlap, f, 1, vae.config.out_channels)
    # The tail has no attention, so it streams in bands of whole rows (codec/streaming.py): exact, and nothing
    # is decoded twice. Its first up block runs whole, at a few times the latent features' memory (~130 MiB of
    # output at 1024x1024 with SD's config), so that its norms, whose errors every later layer carries, see the
    # whole input, and the stats passes start from its exact output. On four 1024x1024 Kodak crops with the
    # embedded model, tiled-against-untiled PSNR went from 40.4-46.0 dB (passes at 1/2 and 1/4 of the size) to
    # 47.1-51.4 with passes at 3/8 and 3/16, which cost 56% as much (at 1/4 and 1/8: 39.4-44.5; at 5/16 and
    # 5/32: 43.6-48.3). Both passes run every up block: letting the larger one stop before the last block (whose
    # norms then took the smaller pass's statistics as they were) saved time (1.21x -> 1.13x untiled, SD config)
    # and cost v2 about 1 dB, but with v3 it fell to 31.0-43.6 dB on eight Kodak crops, and 41.3-55.6 without it
    # (3/8 stays best there: 1/4 35.8-45.2, 5/16 40.9-43.7, 7/16 41.5-45.8 on four of them). Time with every
    # block on an AVX512-BF16 EPYC: 1.00-1.06x untiled with bf16 passes, 1.14x with fp32 ones. A band holds half a
    # tile's latent positions: a tile's worth made the stream's peak exceed diffusers' tiled decode at 1024x1024
    # (1155 MiB against about 1190, before the features and the stats passes), half of it peaked at 780-800 MiB
    # for 3-5% more time (SD config, 2 CPU threads).
    features = guarded(lambda m, t: m.decode_head(t), z)
    latent_width = features.shape[-1]
    features = guarded(lambda m, t: m.decoder.up_blocks[0](t), features)
    growth = features.shape[-1] // latent_width  # 2 where the first up block upsamples
    band_rows = max(1, tile * tile // (2 * latent_width)) * growth
    run_tail = functools.partial(guarded, lambda m, t: m.decoder.forward_tail(t, first_block=1))
    stats = tiling.estimate_norm_stats(vae.decoder, run_tail, features, tile * growth, 1, fraction=STATS_FRACTION)
    with tiling.shared_norm_stats(vae.decoder, stats):
        return guarded(lambda m, t: streaming.stream_decoder_tail(m.decoder, t, band_rows, first_block=1), features)


def _run(vae, x: torch.Tensor, *, encode: bool) -> torch.Tensor:
    """Encode (images -> moments) or decode (latents -> images), sliced and tiled to fit the memory budget."""
    if torch.is_grad_enabled() and not x.requires_grad and not any(p.requires_grad for p in vae.parameters()):
        # Nothing to differentiate (a frozen VAE in a training loop): the inference path, with its tiling,
        # slicing and fp32 fallback, rather than the plain graph-building forward.
        with torch.no_grad():
            return _run(vae, x, encode=encode)
    if vae.offloaded:
        # accelerate's sequential offload brings each layer's weights in as that layer runs: only the plain
        # forward lets it (tiling, streaming and the fp32 fallback's copy read weights outside their layers).
        if vae.use_tiling:  # stacklevel 1: this line, so warned once, not at every pipeline step
            message = "sequential offload: encode and decode run untiled (tiling reads weights outside layers)"
            warnings.warn(message, stacklevel=1)
        return vae.encode_moments(x) if encode else vae.decode_raw(x)
    if not torch.is_grad_enabled() and precision.emulated_on_cpu(vae.dtype, x.device):
        return _run(precision.fp32_copy(vae), x.float(), encode=encode).to(x.dtype)
    config = vae.config
    f = config.downsample_factor
    itemsize = torch.finfo(vae.dtype).bits // 8
    estimate = memory.encode_bytes if encode else memory.decode_bytes

    def cost(h: int, w: int, batch: int = 1) -> int:
        return estimate(config, h, w, itemsize, batch)

    def network(model, t):
        return model.encode_moments(t) if encode else model.decode_raw(t)

    untiled_network = _compiled(encode, vae.compile_mode) if vae.compile_mode else network

    if torch.is_grad_enabled():
        return network(vae, x)

    # The device's layout (channels-last on a CPU, where oneDNN runs the convolutions without reordering every
    # input; NCHW on a GPU, where GroupNorm wants it): it carries through the network, and the result goes back
    # to the default.
    x = x.contiguous(memory_format=preferred_memory_format(x.device))
    batch, _, h, w = x.shape
    budget = _budget(vae)
    use_tiling = vae.use_tiling if vae.use_tiling is not None else cost(h, w) > budget
    tile = _tile_size(vae, cost, budget, h, w, f if encode else 1) if use_tiling else 0
    # One tile's area holds the whole input (a thin strip wider than a tile): it runs whole, exact, in the memory
    # of one tile (helper's probe, 24x136 pixels at tile 16: tiled had been 17.7 dB against untiled; diffusers
    # 35.2).
    if use_tiling and ((tile >= h and tile >= w) or h * w <= tile * tile):
        use_tiling = False
    if vae.use_slicing or use_tiling:
        slice_size = 1
    else:
        slice_size = max(1, min(batch, budget // max(cost(h, w), 1)))

    guarded = _Fp32Fallback(vae)
    outputs = []
    for start in range(0, batch, slice_size):
        chunk = x[start : start + slice_size]
        if not use_tiling:
            outputs.append(guarded(untiled_network, chunk))
            continue
        before = guarded.fallbacks
        tiled = (_encode_tiled if encode else _decode_tiled)(vae, chunk, tile, guarded)
        if guarded.fallbacks > before and vae.dtype in HALF_DTYPES:
            # A stage recomputed in fp32 hands its result to the next in half precision, where values beyond
            # fp16's range become inf that no later recomputation can undo: the whole tiled pass runs in fp32.
            tiled = _run(precision.fp32_copy(vae), chunk.float(), encode=encode).to(chunk.dtype)
        outputs.append(tiled)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).contiguous()


@functools.cache
def _compiled(encode: bool, mode: str) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """One compiled function per pass and mode, shared by all models: dynamo guards on the model it is given,
    so a second model (or the fp32 fallback's copy) gets its own graph rather than a wrong one."""

    def network(model, t):
        return model.encode_moments(t) if encode else model.decode_raw(t)

    return torch.compile(network, mode=mode)


def encode_moments(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1], any H and W -> posterior moments for the image padded to the factor."""
    _check_input(x, vae.config.in_channels, "encode input")
    x = x.to(device=vae.device, dtype=vae.dtype)
    # FLUX.2's latents split into 2x2 patches: its images are padded to twice the factor (latent_norm.pixel_multiple).
    return _run(vae, pad_to_multiple(x, latent_norm.pixel_multiple(vae.config)), encode=True)


def decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, latent_channels, h, w), unscaled -> images (B, 3, h * f, w * f)."""
    _check_input(z, vae.config.latent_channels, "decode input")
    z = z.to(device=vae.device, dtype=vae.dtype)
    return _run(vae, z, encode=False)
