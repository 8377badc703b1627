"""The building blocks of the SD VAE, named so that their parameters carry diffusers' state-dict keys.

Every attribute name here (norm1, conv_shortcut, to_q, to_out.0, downsamplers.0.conv, ...) is part of the
checkpoint format: renaming one breaks loading of every published SD VAE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codec.groupnorm import GroupNorm

EPS = 1e-6  # the GroupNorm epsilon of every norm in the SD VAE


def preferred_memory_format(device: torch.device) -> torch.memory_format:
    """The layout for activations and convolution weights on `device`.

    Channels-last on a CPU, where oneDNN's convolutions and ATen's GroupNorm both work in NHWC. NCHW elsewhere:
    ATen's group_norm makes its input NCHW-contiguous on every device but the CPU, so on a GPU NHWC activations
    would be transposed before each of an SD decoder's ~30 GroupNorms and back for the convolution after it.
    """
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


class ResnetBlock(nn.Module):
    """GroupNorm -> act -> 3x3 conv, twice, plus a (1x1 conv when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=EPS, act=act_fn)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps=EPS, act=act_fn)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        if h.requires_grad:
            return shortcut + h
        return h.add_(shortcut)  # inference: reuse conv2's output rather than allocating the sum


class Attention(nn.Module):
    """Single-head self-attention over all spatial positions, as in the mid block of the SD VAE."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A ModuleList so the output projection's key is `to_out.0`, as diffusers names it.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only, as the LDM encoder does."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The phase kernels read the conv's weight directly: not where accelerate's offload keeps it on the meta
        # device until the conv itself runs.
        training = torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad)
        if not training and not self.conv.weight.is_meta:
            return upsample_conv_padded(F.pad(x, (1, 1, 1, 1)), self.conv)
        # Training: the textbook form (its backward is torch's). bf16 nearest upsampling is missing or slow on
        # some backends; fp32 costs one copy and is exact.
        dtype = x.dtype
        if dtype == torch.bfloat16:
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x.to(dtype))


def _phase_kernels(weight: torch.Tensor) -> list[torch.Tensor]:
    """The 3x3 kernel as seen by each output phase of a nearest 2x upsampling: four 2x2 kernels.

    An even output row 2i reads upsampled rows 2i-1, 2i, 2i+1, which are input rows i-1, i, i: taps 0 and 1+2
    of the kernel. An odd row 2i+1 reads input rows i, i, i+1: taps 0+1 and 2. Columns likewise. Summed in fp32.
    """
    w = weight.float()

    def split(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0, t1, t2 = t.unbind(dim)
        return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)

    return [kernel.to(weight.dtype) for rows in split(w, 2) for kernel in split(rows, 3)]


def upsample_conv_padded(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(nearest_upsample_2x(x))` for a 3x3, padding-1 conv, where `x` already carries its one row and
    column of padding on every side: (B, C, h + 2, w + 2) in, (B, C_out, 2h, 2w) out.

    Computed as four 2x2 convolutions of the low-resolution input, one per output phase, with the taps that
    read the same input pixel summed beforehand: 16 multiply-adds per input channel for each 2x2 block of
    output instead of 36, and no 4x-sized upsampled copy. Same result up to rounding.
    """
    b, _, h, w = x.shape
    h, w = max(h - 2, 0), max(w - 2, 0)  # a streamed band may not yet complete a row
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((b, conv.out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)
    if h <= 0 or w <= 0:
        return out
    kernels = _phase_kernels(conv.weight)
    for index, kernel in enumerate(kernels):
        row, col = divmod(index, 2)
        out[:, :, row::2, col::2] = F.conv2d(x[:, :, row : row + h + 1, col : col + w + 1], kernel, conv.bias)
    return out


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, act_fn) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)
