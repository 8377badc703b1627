"""Latent codecs under one interface: the VAE, and resampling baselines that store a small RGB image instead.

  bicubic          bicubic down and up by the VAE's own factor f: 3 values per f^2 pixels.
  bicubic-latent   bicubic down and up to as many values as the VAE's latent holds (C per f^2 pixels):
                   3 / s^2 = C / f^2, so the side factor is s = f * sqrt(3 / C) (sqrt(48) ~ 6.93 for SD's).

The factor and channels are those of the VAE(s) in the same run; with none, SD's (f8, 4 channels). A baseline
is what any latent codec must beat: with the same storage precision and about the same number of values, a VAE
that does no better than resampling has learned nothing worth its parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codec.bench import rate

BASELINES = ("bicubic", "bicubic-latent")


@dataclass(frozen=True)
class LatentShape:
    """A VAE's downscale factor per side and its latent channels: the rate a baseline is matched to."""

    factor: int
    channels: int
    model: str | None = None  # the row it was taken from; None for SD's, used when the run has no VAE


SD_LATENT = LatentShape(8, 4)


def side_factor(spec: str, latent: LatentShape) -> float:
    """How much a baseline shrinks each side: the VAE's factor, or as far as keeps as many values as its latent."""
    if spec == "bicubic":
        return float(latent.factor)
    if spec == "bicubic-latent":
        return latent.factor * math.sqrt(3.0 / latent.channels)
    raise ValueError(f"unknown baseline {spec!r}; choose one of {', '.join(BASELINES)}")


class LatentCodec:
    """encode: (B, 3, H, W) in [-1, 1] -> stored latent; decode: stored latent -> (B, 3, H, W) in [-1, 1]."""

    name: str
    kind: str
    spec: str
    params: int = 0
    device: torch.device = torch.device("cpu")

    def __init__(self, name: str, spec: str, precision: str) -> None:
        self.name, self.spec, self.precision = name, spec, precision

    def encode(self, x: torch.Tensor) -> rate.Stored:
        raise NotImplementedError

    def decode(self, stored: rate.Stored, size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weights_mb(self) -> float:
        return 0.0

    def describe(self) -> str:
        return self.spec


class ResampleBaseline(LatentCodec):
    kind = "baseline"

    def __init__(
        self, name: str, spec: str, precision: str, device: torch.device, latent: LatentShape = SD_LATENT
    ) -> None:
        super().__init__(name, spec, precision)  # name: the row's (bicubic-2 when asked for twice)
        self.latent = latent
        self.factor = side_factor(spec, latent)
        self.device = device

    def small_size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, round(height / self.factor)), max(1, round(width / self.factor))

    def encode(self, x: torch.Tensor) -> rate.Stored:
        small = F.interpolate(
            x.to(self.device).float(), size=self.small_size(*x.shape[-2:]), mode="bicubic", antialias=True
        )
        return rate.store(small.clamp(-1.0, 1.0), self.precision)

    def decode(self, stored: rate.Stored, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(rate.load(stored), size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)

    def describe(self) -> str:
        latent = self.latent
        matched = f"{latent.model}'s" if latent.model else "SD's"
        return (
            f"bicubic down and up by {self.factor:.3f} per side (3 values per {self.factor**2:.1f} pixels), for "
            f"{matched} {latent.channels}-channel latent at factor {latent.factor}"
        )


class VaeCodec(LatentCodec):
    kind = "vae"

    def __init__(self, name: str, spec: str, precision: str, vae) -> None:
        super().__init__(name, spec, precision)
        self.vae = vae
        self.device = vae.device
        self.params = sum(p.numel() for p in vae.parameters())

    @property
    def weights_mb(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.vae.parameters()) / 2**20

    def encode(self, x: torch.Tensor) -> rate.Stored:
        # The posterior mean, scaled as `codec encode` stores it: what a user of the codec would keep on disk.
        z = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist.mode()
        return rate.store(self.vae.scale_latents(z.float()), self.precision)

    def decode(self, stored: rate.Stored, size: tuple[int, int]) -> torch.Tensor:
        z = self.vae.unscale_latents(rate.load(stored)).to(self.vae.dtype)
        return self.vae.decode(z).sample[..., : size[0], : size[1]].float()

    @property
    def latent(self) -> LatentShape:
        return LatentShape(self.vae.downsample_factor, self.vae.config.latent_channels, self.name)

    def describe(self) -> str:
        config = self.vae.config
        return (
            f"{self.spec}: {self.params / 1e6:.2f}M parameters, {config.latent_channels}-channel latent, "
            f"factor {self.vae.downsample_factor}"
        )


def load_codec(
    spec: str, name: str, precision: str, device: torch.device, dtype: torch.dtype, latent: LatentShape = SD_LATENT
) -> LatentCodec:
    """A baseline by name (matched to `latent`), else a VAE through `AutoencoderKL.load` (folder, file, hub id,
    builtin, preset)."""
    if spec in BASELINES:
        return ResampleBaseline(name, spec, precision, device, latent)
    from codec.model import AutoencoderKL

    vae = AutoencoderKL.load(spec, torch_dtype=dtype).to(device).eval()
    return VaeCodec(name, spec, precision, vae)
