"""What `AutoencoderKL.encode`/`decode` do around the network: input checks, padding to the downsampling
factor, batch slicing and tiling within a memory budget, and the fp32 retry for half-precision overflow.

With gradients enabled (training) only the checks and padding apply: tiling and slicing are inference tools,
and a training step must see exactly the network it optimises.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from codec import memory, tiling

log = logging.getLogger(__name__)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_TILE_LATENT = 16


class _Fp32Fallback:
    """Recompute a half-precision result that came out non-finite with an fp32 copy of the model, made once."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        self._fp32: torch.nn.Module | None = None

    def __call__(self, run: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        y = run(self.vae, x)
        if y.dtype not in HALF_DTYPES or torch.isfinite(y).all():
            return y
        if self._fp32 is None:
            log.warning("%s result was not finite; recomputing in float32 (force_upcast)", y.dtype)
            self._fp32 = copy.deepcopy(self.vae).float()
        return run(self._fp32, x.float()).to(y.dtype)


def _check_input(x: torch.Tensor, channels: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must have shape (batch, {channels}, height, width), got {tuple(x.shape)}")
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
    return vae.memory_budget if vae.memory_budget is not None else memory.default_budget(vae.device)


def _largest_tile(cost: Callable[[int], int], budget: int, limit: int, align: int) -> int:
    """Largest aligned square tile side (input units, at most `limit`) whose cost fits the budget."""
    side = max(align, limit - limit % align)
    while side > align and cost(side) > budget:
        side = max(align, (side * 3 // 4) // align * align)
    return side


def _run(vae, x: torch.Tensor, *, encode: bool) -> torch.Tensor:
    config = vae.config
    f = config.downsample_factor
    itemsize = torch.finfo(vae.dtype).bits // 8
    if encode:
        align, scale, out_channels = f, 1 / f, 2 * config.latent_channels

        def cost(h, w, b=1):
            return memory.encode_bytes(config, h, w, itemsize, b)

        def network(model, t):
            return model.encode_moments(t)
    else:
        align, scale, out_channels = 1, f, config.out_channels

        def cost(h, w, b=1):
            return memory.decode_bytes(config, h, w, itemsize, b)

        def network(model, t):
            return model.decode_raw(t)

    if torch.is_grad_enabled():
        return network(vae, x)

    batch, _, h, w = x.shape
    budget = _budget(vae)
    tile_needed = cost(h, w) > budget
    use_tiling = vae.use_tiling if vae.use_tiling is not None else tile_needed
    slice_size = batch
    if vae.use_slicing or cost(h, w, batch) > budget:
        per_sample = cost(h, w) if not use_tiling else 0
        slice_size = 1 if vae.use_slicing or not per_sample else max(1, budget // per_sample)

    guarded = _Fp32Fallback(vae)
    if use_tiling:
        if vae.tile_latent_size:
            tile = vae.tile_latent_size * (f if encode else 1)
        else:
            tile = _largest_tile(lambda s: cost(s, s), budget, max(h, w), align)
            tile = max(tile, MIN_TILE_LATENT * (f if encode else 1))
        overlap = tiling.overlap_for(tile, align)
        if tile >= h and tile >= w:
            use_tiling = False

    outputs = []
    for start in range(0, batch, slice_size):
        chunk = x[start : start + slice_size]
        if use_tiling:

            def run_tile(t, _network=network):
                return guarded(_network, t)

            outputs.append(tiling.tiled_apply(vae, run_tile, chunk, tile, overlap, scale, align, out_channels))
        else:
            outputs.append(guarded(network, chunk))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def encode_moments(vae, x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1], any H and W -> posterior moments for the image padded to the factor."""
    _check_input(x, vae.config.in_channels, "encode input")
    x = x.to(device=vae.device, dtype=vae.dtype)
    return _run(vae, pad_to_multiple(x, vae.config.downsample_factor), encode=True)


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, latent_channels, h, w), unscaled -> images (B, 3, h * f, w * f)."""
    _check_input(z, vae.config.latent_channels, "decode input")
    z = z.to(device=vae.device, dtype=vae.dtype)
    return _run(vae, z, encode=False)
