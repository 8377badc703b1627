"""The rate of a latent codec: store the latent at a precision, decode what was stored, count its bits.

The latent is actually rounded to the storage precision before decoding, so the measured quality is the
quality at the stated rate, not that of the float32 latent.

  fp16, bf16  16 bits a value; the stored value is the float32 latent cast to that type.
  uint8       8 bits a value, with a float32 scale and offset per channel and image (so 64 bits per channel
              of side information, counted in the rate). TAESD's authors note SD latents survive 8 bits.

Bits per pixel are over the pixels of the image (not of the padded input the codec may have encoded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("fp16", "bf16", "uint8")
_VALUE_BITS = {"fp16": 16, "bf16": 16, "uint8": 8}
_SIDE_BITS_PER_CHANNEL = {"fp16": 0, "bf16": 0, "uint8": 64}  # float32 scale + float32 offset


@dataclass(frozen=True)
class Stored:
    """A batch of latents as stored: `values` (B, C, h, w), plus per-channel scale/offset for uint8."""

    precision: str
    values: torch.Tensor
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def bits_per_image(self) -> int:
        channels, height, width = self.values.shape[1:]
        return (
            channels * height * width * _VALUE_BITS[self.precision] + channels * _SIDE_BITS_PER_CHANNEL[self.precision]
        )


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown latent precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def store(latent: torch.Tensor, precision: str) -> Stored:
    """Round a (B, C, h, w) float latent to the storage precision."""
    check_precision(precision)
    latent = latent.float()
    if precision == "fp16":
        # Outside fp16's range a value would become inf and the decode garbage; saturate as a real store would.
        return Stored(precision, latent.clamp(-65504.0, 65504.0).to(torch.float16))
    if precision == "bf16":
        return Stored(precision, latent.to(torch.bfloat16))
    low = latent.amin(dim=(2, 3), keepdim=True)
    high = latent.amax(dim=(2, 3), keepdim=True)
    # A constant channel has no range: any positive scale reproduces it exactly from the offset.
    scale = torch.where(high > low, (high - low) / 255.0, torch.ones_like(high))
    levels = torch.round((latent - low) / scale).clamp(0, 255).to(torch.uint8)
    return Stored(precision, levels, scale=scale, offset=low)


def load(stored: Stored) -> torch.Tensor:
    """The float32 latent a decoder gets back from storage."""
    if stored.precision == "uint8":
        return stored.values.float() * stored.scale + stored.offset
    return stored.values.float()


def bits_per_pixel(bits: int, height: int, width: int) -> float:
    return bits / float(height * width)
