"""codec.bench.rate and the resampling baselines: stored precision, bits per pixel, values per pixel."""

from __future__ import annotations

import math

import pytest
import torch

from codec.bench import rate
from codec.bench.baselines import SD_LATENT, ResampleBaseline, side_factor


@pytest.fixture
def latent() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 6, generator=generator) * torch.tensor([1.0, 5.0, 0.1, 30.0]).view(1, 4, 1, 1)


def test_fp16_and_bf16_store_what_the_type_holds(latent):
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        stored = rate.store(latent, precision)
        assert stored.values.dtype == dtype
        assert torch.equal(rate.load(stored), latent.to(dtype).float())
        assert stored.bits_per_image() == 4 * 8 * 6 * 16


def test_fp16_saturates_instead_of_overflowing():
    stored = rate.store(torch.tensor([[[[1e6, -1e6]]]]), "fp16")
    assert torch.isfinite(rate.load(stored)).all()


def test_uint8_error_is_at_most_half_a_step_and_side_information_is_counted(latent):
    stored = rate.store(latent, "uint8")
    assert stored.values.dtype == torch.uint8
    error = (rate.load(stored) - latent).abs()
    assert (error <= stored.scale / 2 + 1e-5).all()
    # Each channel's extremes are exact levels (0 and 255).
    assert torch.allclose(rate.load(stored).amax(dim=(2, 3)), latent.amax(dim=(2, 3)), atol=1e-5)
    assert stored.bits_per_image() == 4 * 8 * 6 * 8 + 4 * 64


def test_uint8_constant_channel_is_exact():
    latent = torch.full((1, 2, 4, 4), 0.25)
    assert torch.equal(rate.load(rate.store(latent, "uint8")), latent)


def test_bits_per_pixel_of_an_sd_latent():
    # A 4-channel f8 latent of a 256x256 image: 4 * 32 * 32 values.
    stored = rate.store(torch.zeros(1, 4, 32, 32), "fp16")
    assert rate.bits_per_pixel(stored.bits_per_image(), 256, 256) == 1.0
    stored = rate.store(torch.zeros(1, 4, 32, 32), "uint8")
    assert rate.bits_per_pixel(stored.bits_per_image(), 256, 256) == pytest.approx(0.5 + 256 / 65536)


def test_unknown_precision():
    with pytest.raises(ValueError, match="fp16, bf16, uint8"):
        rate.store(torch.zeros(1, 1, 1, 1), "int4")


def test_bicubic_latent_keeps_as_many_values_as_a_4_channel_f8_latent():
    assert side_factor("bicubic-latent", SD_LATENT) == pytest.approx(math.sqrt(48))
    baseline = ResampleBaseline("bicubic-latent", "bicubic-latent", "fp16", torch.device("cpu"))
    x = torch.rand(1, 3, 256, 384) * 2 - 1
    stored = baseline.encode(x)
    latent_values = 4 * (256 // 8) * (384 // 8)
    assert stored.values.numel() == pytest.approx(latent_values, rel=0.01)
    assert baseline.decode(stored, (256, 384)).shape == x.shape


def test_bicubic_stores_3_values_per_64_pixels():
    baseline = ResampleBaseline("bicubic", "bicubic", "uint8", torch.device("cpu"))
    x = torch.linspace(-1, 1, 64 * 64).view(1, 1, 64, 64).repeat(1, 3, 1, 1)
    stored = baseline.encode(x)
    assert stored.values.shape == (1, 3, 8, 8)
    y = baseline.decode(stored, (64, 64))
    assert y.shape == x.shape and (y - x).abs().mean() < 0.05  # a smooth ramp survives down-and-up
