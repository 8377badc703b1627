"""Row-streamed decoding: the decoder's convolutional tail run over bands of latent rows, exact, nothing twice.

2D tiles recompute their overlaps (at 1024x1024 a 3x3 grid of tiles covers 1.27 times the image) and blend
approximations at the seams. The decoder's tail (up blocks, output norm and conv) holds no attention, so it
can be streamed instead: the latent-resolution features go in a band of rows at a time, and every 3x3
convolution keeps the last two rows of input it has seen, so that the next band continues exactly where the
previous one stopped. The output equals the untiled output row for row (GroupNorm statistics aside: the up
blocks' come shared from a stats pass, as for tiles; the output norm's are exact, its input spilled to a
temporary file until every row has been seen), nothing is computed twice, and memory is bounded by the
band, its rows times the image's width.

A 3x3 convolution's output lags its input by one row (each output row needs the input row below it), so
every layer holds rows back until a last, empty band brings the bottom padding row and flushes them. A
resnet's shortcut is held back by as many rows as its main path. The row count per band therefore varies;
the total is exact.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import torch
import torch.nn.functional as F
from torch import nn

from codec.groupnorm import ChannelMoments, GroupNorm
from codec.layers import ResnetBlock, Upsample, upsample_conv_padded
from codec.networks import Decoder

Fill = Callable[[torch.Tensor], None]  # writes a conv's new input rows into the view it is given


def _empty_rows(like: torch.Tensor, channels: int, rows: int, width: int) -> torch.Tensor:
    """An uninitialised (B, channels, rows, width) tensor, channels-last when `like` is (oneDNN's fast layout)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and like.shape[1] > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((like.shape[0], channels, rows, width), dtype=like.dtype, device=like.device, memory_format=fmt)


class _RowStream:
    """The state carried between bands: each conv's unconsumed input rows, each resnet's held-back shortcut.

    A conv's input buffer starts with the rows carried from the last band, and whatever produces its input
    (a norm, through GroupNorm's `out`, or an upsampling) writes the new rows straight in after them: no
    band-sized copy anywhere.
    """

    def __init__(self) -> None:
        self.carry: dict[nn.Module, torch.Tensor] = {}
        self.held: dict[nn.Module, torch.Tensor] = {}

    def _window(
        self, conv: nn.Conv2d, like: torch.Tensor, rows: int, width: int, fill: Fill, last: bool, pad: int
    ) -> torch.Tensor:
        """The rows a 3x3 window slides over: the two carried from the last band (or the top zero-padding
        row), this band's new rows written by `fill`, and the bottom zero-padding row on the last band; with
        `pad` zero columns on each side."""
        carried = self.carry.pop(conv, None)
        top = 1 if carried is None else carried.shape[2]  # nothing carried yet: the top zero-padding row
        buffer = _empty_rows(like, conv.in_channels, top + rows + int(last), width + 2 * pad)
        if pad:
            buffer[..., :pad].zero_()
            buffer[..., -pad:].zero_()
        if carried is None:
            buffer[:, :, :1].zero_()
        else:
            buffer[:, :, :top] = carried
        if rows:
            fill(buffer[:, :, top : top + rows, pad : pad + width])
        if last:
            buffer[:, :, -1:].zero_()  # the bottom zero-padding row
        else:
            self.carry[conv] = buffer[:, :, -2:].clone()  # a copy, so the band's buffer can be freed
        return buffer

    def conv3x3(
        self, conv: nn.Conv2d, like: torch.Tensor, rows: int, width: int, fill: Fill, last: bool
    ) -> torch.Tensor:
        buffer = self._window(conv, like, rows, width, fill, last, pad=0)
        if buffer.shape[2] < 3:
            return _empty_rows(like, conv.out_channels, 0, width)
        return F.conv2d(buffer, conv.weight, conv.bias, padding=(0, 1))

    def normalized_conv(self, norm: GroupNorm, conv: nn.Conv2d, x: torch.Tensor, last: bool) -> torch.Tensor:
        return self.conv3x3(conv, x, x.shape[2], x.shape[3], lambda out: norm(x, out=out), last)

    def resnet(self, block: ResnetBlock, x: torch.Tensor, last: bool) -> torch.Tensor:
        h = self.normalized_conv(block.norm1, block.conv1, x, last)
        h = self.normalized_conv(block.norm2, block.conv2, h, last)
        shortcut = x
        if block.conv_shortcut is not None:  # a 1x1 conv; torch refuses an input with no rows
            conv = block.conv_shortcut
            shortcut = conv(x) if x.shape[2] else _empty_rows(x, conv.out_channels, 0, x.shape[3])
        # h's rows continue the shortcut rows held back from the last band, then this band's shortcut rows.
        held = self.held.pop(block, shortcut[:, :, :0])
        ready, from_held = h.shape[2], min(h.shape[2], held.shape[2])
        h[:, :, :from_held] += held[:, :, :from_held]
        from_new = ready - from_held
        h[:, :, from_held:] += shortcut[:, :, :from_new]
        if not last:
            self.held[block] = torch.cat([held[:, :, from_held:], shortcut[:, :, from_new:]], dim=2)
        return h

    def upsample(self, up: Upsample, x: torch.Tensor, last: bool) -> torch.Tensor:
        # Slides over low-resolution rows (upsample_conv_padded): each output row pair needs the input rows
        # above and below, the same window as a 3x3 conv, so the carry works the same way.
        rows, width = x.shape[2:]
        buffer = self._window(up.conv, x, rows, width, lambda out: out.copy_(x), last, pad=1)
        return upsample_conv_padded(buffer, up.conv)

    def up_blocks(self, blocks: Iterable[nn.Module], x: torch.Tensor, last: bool) -> torch.Tensor:
        """Up blocks for one band: the rows of their output that are complete so far."""
        for block in blocks:
            for resnet in block.resnets:
                x = self.resnet(resnet, x, last)
            if block.upsamplers is not None:
                x = self.upsample(block.upsamplers[0], x, last)
        return x

    def output(
        self, decoder: Decoder, x: torch.Tensor, last: bool, stats: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The output norm (with the given statistics) and conv for one band of the up blocks' output."""
        norm, conv = decoder.conv_norm_out, decoder.conv_out
        return self.conv3x3(conv, x, x.shape[2], x.shape[3], lambda out: norm(x, out=out, stats=stats), last)


class _Spill:
    """Bands written to a temporary file and read back in the same order, so that a tensor too large to hold
    (the full-resolution features before the output norm) can wait for statistics over all of its rows.

    The file holds raw bytes, (B, rows, W, C) per band; the operating system may keep it in its page cache,
    which it can drop, unlike the process's own memory.
    """

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.bands: list[tuple[torch.Size, torch.dtype, torch.device]] = []

    def write(self, x: torch.Tensor) -> None:
        rows_last = x.permute(0, 2, 3, 1).contiguous().cpu()  # no copy for a channels-last CPU tensor
        if rows_last.numel():
            self.file.write(memoryview(rows_last.reshape(-1).view(torch.uint8).numpy()))
        self.bands.append((rows_last.shape, x.dtype, x.device))

    def read(self) -> Iterator[torch.Tensor]:
        self.file.seek(0)
        for shape, dtype, device in self.bands:
            if shape.numel() == 0:  # a band that completed no rows yet (rows lag by a few per layer)
                yield torch.empty(shape, dtype=dtype, device=device).permute(0, 3, 1, 2)
                continue
            rows_last = torch.empty(shape, dtype=dtype)  # read straight into, no zero-filled buffer first
            raw = rows_last.view(-1).view(torch.uint8).numpy()
            if self.file.readinto(memoryview(raw)) != raw.nbytes:
                raise RuntimeError(f"stream spill file {self.file.name} was truncated")
            yield rows_last.permute(0, 3, 1, 2).to(device)  # channels-last strides, as written


def stream_decoder_tail(decoder: Decoder, features: torch.Tensor, band_rows: int, first_block: int = 0) -> torch.Tensor:
    """`decoder.forward_tail(features, first_block)` computed `band_rows` rows of `features` at a time, in memory
    bounded by the band.

    No gradient (the in-place residual add). The up blocks' GroupNorms normalise with their inputs' own
    statistics unless shared ones are installed (tiling.shared_norm_stats), and a band's own statistics are
    not the image's. The output norm's statistics are always exact: the up blocks' output is spilled to a
    temporary file while its moments are summed over every row, then read back through the output norm and
    conv. That norm's statistics matter most (docs/tiling.md), and its input is the largest activation of all,
    so this is the one norm worth a second look at its input.
    """
    if band_rows < 1:
        raise ValueError(f"band_rows must be at least 1, got {band_rows}")
    b, _, h, w = features.shape
    blocks = decoder.up_blocks[first_block:]
    scale = 2 ** sum(block.upsamplers is not None for block in blocks)
    out = features.new_empty((b, decoder.conv_out.out_channels, h * scale, w * scale))
    stream, moments = _RowStream(), ChannelMoments()
    filled = 0
    # A temporary file is deleted when closed, and by the operating system if the process dies first.
    with tempfile.TemporaryFile(prefix="codec-stream-") as file, torch.no_grad():
        spill = _Spill(file)
        # The rows every layer still holds back come out in a flush of their own, after the last band:
        # with the last band they would make that band the largest (about 12 latent rows more for SD's).
        bands = [features[:, :, top : top + band_rows] for top in range(0, h, band_rows)] + [features[:, :, h:]]
        for index, band in enumerate(bands):
            rows = stream.up_blocks(blocks, band, last=index == len(bands) - 1)
            moments.update(rows)
            spill.write(rows)
        stats = moments.group_stats(decoder.conv_norm_out.num_groups)
        for index, rows in enumerate(spill.read()):
            image_rows = stream.output(decoder, rows, index == len(bands) - 1, stats)
            out[:, :, filled : filled + image_rows.shape[2]] = image_rows
            filled += image_rows.shape[2]
    if filled != h * scale:  # every row is produced exactly once; anything else is a bug here
        raise RuntimeError(f"row streaming produced {filled} rows, expected {h * scale}")
    return out
