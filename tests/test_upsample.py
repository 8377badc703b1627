"""The upsampler's inference form (four 2x2 convolutions of the low-resolution input, one per output phase)
must equal nearest 2x upsampling followed by the 3x3 conv, which is what training and diffusers compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codec.layers import Upsample


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (8, 8)])
def test_phase_convolutions_equal_upsample_then_conv(channels_last, size):
    torch.manual_seed(0)
    up = Upsample(6).eval()
    x = torch.randn(2, 6, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.no_grad():
        fast = up(x)
    assert fast.shape == reference.shape
    if size != (1, 1):  # a 1x1 image is both layouts at once
        assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_training_uses_the_textbook_form_and_gets_the_same_values():
    torch.manual_seed(0)
    up = Upsample(4)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    trained = up(x)
    trained.sum().backward()
    assert x.grad is not None and up.conv.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(up(x), trained.detach(), atol=1e-5, rtol=0)


def test_bf16_phase_convolutions_stay_close_to_fp32():
    torch.manual_seed(0)
    up = Upsample(8).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        reference = up(x)
        half = up.to(torch.bfloat16)(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, atol=0.05, rtol=0.02)
