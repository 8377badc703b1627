"""Encoder and decoder of the SD VAE (LDM's kl-f8 family), with diffusers' module layout."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from codec.config import AutoencoderKLConfig
from codec.groupnorm import GroupNorm
from codec.layers import EPS, DownBlock, MidBlock, UpBlock


class _Checkpointable(nn.Module):
    gradient_checkpointing: bool = False

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Recompute activations in the backward pass instead of storing them: memory for time, in training only.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


class Encoder(_Checkpointable):
    """Image (B, 3, H, W) -> posterior moments (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block,
                groups,
                config.act_fn,
                downsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups, config.act_fn, config.mid_block_add_attention)
        # diffusers hard-codes SiLU here whatever act_fn says; so must we, for the same function.
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS, act="silu")
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tail(self.forward_head(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional part, down to the latent resolution: local, so it can run tile by tile."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = self._run(block, x)
        return x

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        """The mid block (global attention) and output conv, at the latent resolution."""
        x = self._run(self.mid_block, x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(_Checkpointable):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h * f, w * f) in about [-1, 1]."""

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        channels = tuple(reversed(config.decoder_channels))
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.act_fn, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block + 1,
                groups,
                config.act_fn,
                upsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS, act="silu")
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_tail(self.forward_head(z))

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """Input conv and mid block (global attention) at the latent resolution."""
        return self._run(self.mid_block, self.conv_in(z))

    def forward_tail(self, x: torch.Tensor, first_block: int = 0) -> torch.Tensor:
        """The convolutional upsampling part, from up block `first_block` on: local, so it can run tile by tile."""
        for block in self.up_blocks[first_block:]:
            x = self._run(block, x)
        return self.conv_out(self.conv_norm_out(x))
