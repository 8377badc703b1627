"""FLUX.2's latent normalisation: 2x2 patches of the raw latent folded into channels, then batch-normalised.

diffusers' `AutoencoderKLFlux2` keeps the statistics in a `bn` module (a BatchNorm2d without affine weights over
`patch_h * patch_w * latent_channels` channels) that its forward never runs; the Flux2 pipelines use its buffers:

    latents = (patchify(z) - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)    # encode side
    z = unpatchify(latents * sqrt(bn.running_var + batch_norm_eps) + bn.running_mean)    # decode side

Patchify puts the patch's offset after the channel: output channel `c * ph * pw + dy * pw + dx` holds
`z[c, ph * i + dy, pw * j + dx]` at position (i, j), as the pipelines' `_patchify_latents` does.

The statistics are weights here as in diffusers (state-dict keys `bn.running_mean`, `bn.running_var`,
`bn.num_batches_tracked`), not config fields, so a diffusers folder's weights load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def patchify(z: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) -> (B, C * ph * pw, H / ph, W / pw): each patch's pixels become channels."""
    squeeze = z.dim() == 3
    if squeeze:
        z = z[None]
    batch, channels, height, width = z.shape
    ph, pw = patch
    if height % ph or width % pw:
        raise ValueError(f"a latent of {height}x{width} does not split into {ph}x{pw} patches")
    folded = z.reshape(batch, channels, height // ph, ph, width // pw, pw).permute(0, 1, 3, 5, 2, 4)
    folded = folded.reshape(batch, channels * ph * pw, height // ph, width // pw)
    return folded[0] if squeeze else folded


def unpatchify(latents: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify`."""
    squeeze = latents.dim() == 3
    if squeeze:
        latents = latents[None]
    batch, folded, height, width = latents.shape
    ph, pw = patch
    if folded % (ph * pw):
        raise ValueError(f"{folded} channels are not a whole number of {ph}x{pw} patches")
    z = latents.reshape(batch, folded // (ph * pw), ph, pw, height, width).permute(0, 1, 4, 2, 5, 3)
    z = z.reshape(batch, folded // (ph * pw), height * ph, width * pw)
    return z[0] if squeeze else z


class LatentBatchNorm(nn.Module):
    """The statistics of patchified latents, with diffusers' `bn` buffer names; never run as a layer."""

    def __init__(self, latent_channels: int, patch_size: tuple[int, int], eps: float, momentum: float) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.eps, self.momentum = eps, momentum  # momentum: kept for the config; nothing here updates the statistics
        channels = latent_channels * self.patch_size[0] * self.patch_size[1]
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std, shaped to broadcast over (B, C', h, w) or (C', h, w), in `like`'s dtype and device."""
        shape = (-1, 1, 1)
        std = torch.sqrt(self.running_var.float() + self.eps)  # in fp32: half-precision buffers round the eps away
        return (
            self.running_mean.to(like.device, like.dtype).view(shape),
            std.to(like.device, like.dtype).view(shape),
        )

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> what FLUX.2's transformer sees."""
        patched = patchify(z, self.patch_size)
        mean, std = self.statistics(patched)
        return (patched - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""
        mean, std = self.statistics(latents)
        return unpatchify(latents * std + mean, self.patch_size)

    def record(self) -> dict:
        """The normalisation as JSON-ready numbers (a cache's manifest, a latents file)."""
        return {
            "kind": "patch_batch_norm",
            "patch_size": list(self.patch_size),
            "running_mean": self.running_mean.float().tolist(),
            "running_var": self.running_var.float().tolist(),
            "eps": self.eps,
        }

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()} channels, patch {self.patch_size}, eps {self.eps}"


def from_record(record: dict) -> LatentBatchNorm:
    """A LatentBatchNorm holding what `LatentBatchNorm.record` wrote."""
    try:
        patch = tuple(int(v) for v in record["patch_size"])
        mean, var = (torch.tensor(record[name], dtype=torch.float32) for name in ("running_mean", "running_var"))
        eps = float(record["eps"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not a recorded latent batch norm ({error})") from None
    if record.get("kind") != "patch_batch_norm" or len(patch) != 2 or mean.shape != var.shape or mean.dim() != 1:
        raise ValueError("not a recorded latent batch norm (kind, patch_size or statistics malformed)")
    if mean.numel() % (patch[0] * patch[1]):
        raise ValueError(f"{mean.numel()} statistics are not a whole number of {patch[0]}x{patch[1]} patches")
    norm = LatentBatchNorm(mean.numel() // (patch[0] * patch[1]), patch, eps, momentum=0.1)
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(var)
    return norm


def pixel_multiple(config) -> int:
    """Image sides must be multiples of this for the normalised latent to exist: the factor times the patch side."""
    patch = getattr(config, "patch_size", None)
    return config.downsample_factor * (max(patch) if patch else 1)


def build(config) -> LatentBatchNorm | None:
    """The `bn` module a config asks for, or None for an AutoencoderKL that scales by its config."""
    if getattr(config, "patch_size", None) is None:
        return None
    return LatentBatchNorm(config.latent_channels, config.patch_size, config.batch_norm_eps, config.batch_norm_momentum)


def of_model(model) -> LatentBatchNorm | None:
    """A float32 CPU copy of a model's latent statistics (ours, or the `bn` of diffusers' AutoencoderKLFlux2), or
    None for a model without them. A copy: a data loader's workers and a manifest need no GPU tensors."""
    bn = getattr(model, "bn", None)
    if bn is None:
        return None
    if isinstance(bn, LatentBatchNorm):
        return from_record(bn.record())
    patch = tuple(model.config.patch_size)  # diffusers' BatchNorm2d: the patch size is in its config
    return from_record(
        {
            "kind": "patch_batch_norm",
            "patch_size": list(patch),
            "running_mean": bn.running_mean.float().tolist(),
            "running_var": bn.running_var.float().tolist(),
            "eps": bn.eps,
        }
    )


def inferred_fields(tensors: dict[str, torch.Tensor], encoder_channels: tuple[int, ...]) -> dict:
    """What a single file's diffusers-layout tensors say of FLUX.2's config beyond an AutoencoderKL's: the batch norm
    (its statistics are `bn.*`; the patch is 2x2, as in every FLUX.2 file) and a decoder narrower than the encoder."""
    fields = {}
    decoder = tuple(
        tensors[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0]
        for i in reversed(range(len(encoder_channels)))
        if f"decoder.up_blocks.{i}.resnets.0.conv1.weight" in tensors
    )
    if len(decoder) == len(encoder_channels) and decoder != tuple(encoder_channels):
        fields["decoder_block_out_channels"] = decoder
    if "bn.running_mean" in tensors or fields:
        fields.update(patch_size=(2, 2), batch_norm_eps=1e-4, batch_norm_momentum=0.1, scaling_factor=1.0)
        fields.update(shift_factor=None, latents_mean=None, latents_std=None)
    return fields
