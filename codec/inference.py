"""What `AutoencoderKL.encode`/`decode` do around the network, as one pipeline:

    check and pad the input -> training? the plain network
    -> plan: tile or not, images per slice (the memory budget, the options)
    -> each slice under the precision fallbacks (codec.precision.Fallbacks): the untiled network, or the
       pass's tiled runner

An encode or a decode is described once, as a `Pass`: its network, its memory cost and its tiled runner. The
settings live in one `InferenceOptions` per model, which the model's diffusers-named attributes read and write.

With gradients enabled (training) only the checks and padding apply: tiling and slicing are inference tools,
and a training step must see exactly the network it optimises. A frozen VAE on an input without gradient (a
diffusion trainer encoding under autograd) has nothing to differentiate, so it takes the inference path.
Why tiles, streamed bands and statistics passes look as they do: docs/tiling.md.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from codec import latent_norm, memory, precision, streaming, tiling
from codec.config import AutoencoderKLConfig
from codec.layers import preferred_memory_format

if TYPE_CHECKING:
    from codec.model import AutoencoderKL

MIN_TILE_LATENT = 16
# Up to this many latent positions (a 1024x1024 image at f8) the mid block's attention runs over the whole
# image even when tiling; beyond, its quadratic cost dominates and it runs per tile, as in diffusers.
GLOBAL_ATTENTION_MAX_TOKENS = 128 * 128
# Tiled decode's statistics passes run at this fraction of the first up block's output and at half that: the
# best fidelity per cost among the fractions tried (docs/tiling.md).
STATS_FRACTION = 3 / 8
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

Network = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Check = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (stage output, stage input) -> output, or raise


# ---- settings -----------------------------------------------------------------------------------


@dataclass
class InferenceOptions:
    """How a model encodes and decodes outside training; see AutoencoderKL.enable_tiling and friends."""

    use_tiling: bool | None = None  # None: tile only when the memory budget requires it
    use_slicing: bool | None = None  # None: split the batch only when the memory budget requires it
    memory_budget: float | None = None  # bytes (inf: never tile); None: chosen from the device
    tile_latent_size: int | None = None  # latent side of a tile; None: the largest that fits the budget
    compile_mode: str | None = None  # torch.compile mode for untiled inference; None: eager


def check_tile_size(
    size: int | None, name: str = "tile_latent_size", unit: str = "latent pixels", minimum: int = 2
) -> int | None:
    """A tile side (by default in latent positions, at least 2), or None for the largest the budget allows."""
    if size is None:
        return None
    try:
        checked = operator.index(size)  # an int, a numpy int; not 2.5
    except TypeError:
        checked = 0
    if checked < minimum:
        raise ValueError(f"{name} must be a whole number of {unit} >= {minimum}, got {size!r}")
    return checked


def check_compile_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    return mode


class InferenceSetting:
    """A model attribute that reads and writes one field of the model's `inference_options`, through `check`."""

    def __init__(self, check: Callable | None = None) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model, owner: type | None = None):
        return self if model is None else getattr(model.inference_options, self.name)

    def __set__(self, model, value) -> None:
        setattr(model.inference_options, self.name, value if self.check is None else self.check(value))


# ---- the two passes -----------------------------------------------------------------------------


def _stage(check: Check, run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: check(run(t), t)


def _encode_tiled(model: AutoencoderKL, x: torch.Tensor, tile: int, check: Check) -> torch.Tensor:
    config = model.config
    f = config.downsample_factor
    overlap = tiling.overlap_for(tile, f)
    if (x.shape[-2] // f) * (x.shape[-1] // f) > GLOBAL_ATTENTION_MAX_TOKENS:
        # Too many positions for one global attention: the whole encoder runs per tile, attention included.
        run_all = _stage(check, model.encode_moments)
        return tiling.tiled_apply(model, run_all, x, tile, overlap, 1 / f, f, 2 * config.latent_channels)
    # Tile only the convolutional part; the mid block's attention then sees the whole image, as untiled.
    run_head = _stage(check, model.encoder.forward_head)
    features = tiling.tiled_apply(model.encoder, run_head, x, tile, overlap, 1 / f, f, config.block_out_channels[-1])
    return check(model.encode_tail(features), features)


def _decode_tiled(model: AutoencoderKL, z: torch.Tensor, tile: int, check: Check) -> torch.Tensor:
    if z.shape[-2] * z.shape[-1] > GLOBAL_ATTENTION_MAX_TOKENS:
        f, overlap = model.config.downsample_factor, tiling.overlap_for(tile, 1)
        return tiling.tiled_apply(
            model, _stage(check, model.decode_raw), z, tile, overlap, f, 1, model.config.out_channels
        )
    # The tail has no attention, so it streams in bands of whole rows (codec/streaming.py). Its first up block
    # runs whole, so that its norms see the whole input and the statistics passes start from its exact output.
    features = check(model.decode_head(z), z)
    latent_width = features.shape[-1]
    features = _stage(check, model.decoder.up_blocks[0])(features)
    growth = features.shape[-1] // latent_width  # 2 where the first up block upsamples
    # A band holds half a tile's latent positions: a whole tile's would peak above diffusers' tiled decode.
    band_rows = max(1, tile * tile // (2 * latent_width)) * growth
    run_tail = _stage(check, lambda t: model.decoder.forward_tail(t, first_block=1))
    stats = tiling.estimate_norm_stats(model.decoder, run_tail, features, tile * growth, 1, fraction=STATS_FRACTION)
    with tiling.shared_norm_stats(model.decoder, stats):
        return check(streaming.stream_decoder_tail(model.decoder, features, band_rows, first_block=1), features)


@dataclass(frozen=True)
class Pass:
    """One direction through the model, as the pipeline runs it."""

    name: str  # "encode" or "decode", as error messages say it
    input_channels: Callable[[AutoencoderKLConfig], int]
    pads_input: bool  # images are padded to the downsampling factor; latents need not be
    network: Network  # the whole network, untiled, no padding or fallback
    cost: Callable[[AutoencoderKLConfig, int, int, int, int], int]  # activation bytes (config, h, w, itemsize, batch)
    tile_unit: Callable[[AutoencoderKLConfig], int]  # input positions per latent position
    tiled: Callable[[AutoencoderKL, torch.Tensor, int, Check], torch.Tensor]  # (model, x, tile side, check)


ENCODE = Pass(
    name="encode",
    input_channels=lambda config: config.in_channels,
    pads_input=True,
    network=lambda model, x: model.encode_moments(x),
    cost=memory.encode_bytes,
    tile_unit=lambda config: config.downsample_factor,
    tiled=_encode_tiled,
)
DECODE = Pass(
    name="decode",
    input_channels=lambda config: config.latent_channels,
    pads_input=False,
    network=lambda model, z: model.decode_raw(z),
    cost=memory.decode_bytes,
    tile_unit=lambda config: 1,
    tiled=_decode_tiled,
)


@functools.cache
def _compiled(step: Pass, mode: str) -> Network:
    """One compiled function per pass and mode, shared by all models: dynamo guards on the model it is given,
    so a second model (or the fp32 fallback's copy) gets its own graph rather than a wrong one."""

    def network(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return step.network(model, x)

    return torch.compile(network, mode=mode)


# ---- the pipeline -------------------------------------------------------------------------------


def run_pass(vae: AutoencoderKL, x: torch.Tensor, step: Pass) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1], any H and W -> posterior moments of the image padded to the factor
    (ENCODE); unscaled latents (B, latent_channels, h, w) -> images (B, 3, h * f, w * f) (DECODE)."""
    _check_input(x, step.input_channels(vae.config), f"{step.name} input")
    x = x.to(device=vae.device, dtype=vae.dtype)
    if step.pads_input:  # FLUX.2's latents split into 2x2 patches: its images pad to twice the factor
        x = pad_to_multiple(x, latent_norm.pixel_multiple(vae.config))
    options = vae.inference_options
    if vae.offloaded:
        # accelerate's sequential offload brings each layer's weights in as that layer runs: only the plain
        # forward lets it (tiling, streaming and the fp32 fallback's copy read weights outside their layers).
        if options.use_tiling:  # stacklevel 1: this line, so warned once, not at every pipeline step
            message = "sequential offload: encode and decode run untiled (tiling reads weights outside layers)"
            warnings.warn(message, stacklevel=1)
        return step.network(vae, x)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in vae.parameters())):
        return step.network(vae, x)  # training: exactly the network it optimises
    return _infer(vae, x, step, options)


def _infer(vae: AutoencoderKL, x: torch.Tensor, step: Pass, options: InferenceOptions) -> torch.Tensor:
    fallbacks = precision.Fallbacks(vae, x.device)
    planned = fallbacks.model
    tile, slice_size = _plan(planned, x, step, options)
    untiled = _compiled(step, options.compile_mode) if options.compile_mode else step.network

    def compute(model: nn.Module, chunk: torch.Tensor, check: Check) -> torch.Tensor:
        if not tile:
            return check(untiled(model, chunk), chunk)
        side = tile
        if model is not planned:  # retried in fp32: the tile that its larger activations allow
            side = _tile_side(model, step, options, *chunk.shape[-2:], _budget(options.memory_budget, model.device))
        return step.tiled(model, chunk, side, check)

    # The device's layout (channels-last on a CPU, where oneDNN runs the convolutions without reordering every
    # input; NCHW on a GPU, where GroupNorm wants it): it carries through the network, and the result goes back
    # to the default.
    x = x.contiguous(memory_format=preferred_memory_format(x.device))
    outputs = [fallbacks(compute, chunk) for chunk in x.split(slice_size)]
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).contiguous()


def _plan(model: nn.Module, x: torch.Tensor, step: Pass, options: InferenceOptions) -> tuple[int, int]:
    """(tile side in input positions, 0 to run whole; images per slice) for this model's precision."""
    batch, _, h, w = x.shape
    budget = _budget(options.memory_budget, model.device)
    cost = _cost(model, step)
    tiled = options.use_tiling if options.use_tiling is not None else cost(h, w) > budget
    tile = _tile_side(model, step, options, h, w, budget) if tiled else 0
    if tile and ((tile >= h and tile >= w) or h * w <= tile * tile):
        tile = 0  # one tile's area holds the whole input (a strip wider than a tile): whole, exact, as cheap
    slice_size = 1 if options.use_slicing or tile else max(1, min(batch, budget // max(cost(h, w), 1)))
    return tile, slice_size


def _cost(model: nn.Module, step: Pass) -> Callable[[int, int], int]:
    itemsize = torch.finfo(model.dtype).bits // 8
    return lambda h, w: step.cost(model.config, h, w, itemsize, 1)


def _tile_side(model: nn.Module, step: Pass, options: InferenceOptions, h: int, w: int, budget: int) -> int:
    """The tile side asked for, else the largest square whose cost fits the budget, at least MIN_TILE_LATENT."""
    unit = step.tile_unit(model.config)
    if options.tile_latent_size:
        return options.tile_latent_size * unit
    cost = _cost(model, step)
    return max(_largest_tile(lambda side: cost(side, side), budget, max(h, w), unit), MIN_TILE_LATENT * unit)


def _largest_tile(cost: Callable[[int], int], budget: int, limit: int, align: int) -> int:
    """Largest aligned square tile side (input units, at most `limit`) whose cost fits the budget."""
    side = max(align, limit - limit % align)
    while side > align and cost(side) > budget:
        side = max(align, (side * 3 // 4) // align * align)
    return side


def _budget(budget: float | None, device: torch.device) -> int:
    if budget is None:
        return memory.default_budget(device)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or budget <= 0:
        raise ValueError(
            f"memory_budget must be a positive number of bytes (float('inf') never tiles) or None, got {budget!r}"
        )
    return sys.maxsize if math.isinf(budget) else int(budget)  # 5e6 is as good a number of bytes as 5_000_000


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
