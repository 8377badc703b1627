"""Other diffusers autoencoders as benchmark rows: the latent a `codec.foreign.ForeignAutoencoder` makes, stored at
the benchmark's precision and counted for its rate, then decoded by diffusers' own class."""

from __future__ import annotations

import torch

from codec.bench import rate
from codec.bench.baselines import LatentCodec, LatentShape
from codec.foreign import ForeignAutoencoder, is_foreign, load_foreign


class ForeignCodec(LatentCodec):
    """Matched by JPEG and WebP at its rate as our VAEs are; its description names the diffusers class."""

    kind = "vae"

    def __init__(self, name: str, spec: str, precision: str, autoencoder: ForeignAutoencoder) -> None:
        super().__init__(name, spec, precision)
        self.autoencoder = autoencoder
        self.device = autoencoder.device
        self.params = sum(p.numel() for p in autoencoder.parameters())

    @property
    def weights_mb(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.autoencoder.parameters()) / 2**20

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def latent(self) -> LatentShape:
        return LatentShape(self.downsample_factor, self.latent_channels, self.name)

    def encode(self, x: torch.Tensor) -> rate.Stored:
        # The class's raw latent (posterior mode where it has one): the rate counts its values whatever their scale.
        return rate.store(self.autoencoder.encode_latent(x).float(), self.precision)

    def decode(self, stored: rate.Stored, size: tuple[int, int]) -> torch.Tensor:
        return self.autoencoder.decode_latent(rate.load(stored))[..., : size[0], : size[1]].float()

    def describe(self) -> str:
        return f"{self.spec}: {self.autoencoder.describe()}"


def load_foreign_codec(
    spec: str, name: str, precision: str, device: torch.device, dtype: torch.dtype
) -> ForeignCodec | None:
    """The row for a folder of another diffusers autoencoder; None for anything else (our models, baselines)."""
    if not is_foreign(spec):
        return None
    return ForeignCodec(name, spec, precision, load_foreign(spec, torch_dtype=dtype).to(device).eval())
