"""Reconstruction metrics on 8-bit images, as the SD VAE model cards report them.

Inputs are uint8-valued tensors or arrays (B, H, W, 3) or (B, 3, H, W) float in [0, 255]: metrics are taken
after quantisation to 8 bits, because that is the image a user saves and sees.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# uint8 or float, (H, W, 3), (B, H, W, 3) or (B, 3, H, W), as numpy arrays or tensors.
ImageBatch = torch.Tensor | np.ndarray


def _as_float_nchw(images: ImageBatch) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.double()


def psnr(reference: ImageBatch, reconstruction: ImageBatch, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR in dB; identical images give +inf."""
    a, b = _as_float_nchw(reference), _as_float_nchw(reconstruction)
    mse = (a - b).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


SSIM_MIN_SIDE = 11  # one Gaussian window


def _gaussian_window(size: int = SSIM_MIN_SIDE, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    return g / g.sum()


def _ssim_maps(a: torch.Tensor, b: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and contrast-structure over the valid region of an 11x11 Gaussian window (sigma 1.5).

    Channel by channel, with the window applied as two 1-D passes: a 4096x4096 image then needs a few
    hundred MB and seconds, not gigabytes and minutes.
    """
    g = _gaussian_window().to(a.device, torch.float32)
    rows, cols = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, rows), cols)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_means, cs_means = [], []
    for channel in range(a.shape[1]):
        # Centre on the mean first: float32 then keeps E[x^2] - E[x]^2 accurate for 0..255 data.
        offset = a[:, channel : channel + 1].mean()
        x = (a[:, channel : channel + 1] - offset).float()
        y = (b[:, channel : channel + 1] - offset).float()
        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x.square()
        var_y = blur(y * y) - mu_y.square()
        cov = blur(x * y) - mu_x * mu_y
        cs = (2 * cov + c2) / (var_x + var_y + c2)
        mu_x, mu_y = mu_x + offset.float(), mu_y + offset.float()
        luminance = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)
        ssim_means.append((luminance * cs).double().flatten(1).mean(1))
        cs_means.append(cs.double().flatten(1).mean(1))
    return torch.stack(ssim_means, 1).mean(1), torch.stack(cs_means, 1).mean(1)


def ssim(reference: ImageBatch, reconstruction: ImageBatch, data_range: float = 255.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; Gaussian window as scikit-image's gaussian_weights=True)."""
    a, b = _as_float_nchw(reference), _as_float_nchw(reconstruction)
    if min(a.shape[-2:]) < SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    return _ssim_maps(a, b, data_range)[0]


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(reference: ImageBatch, reconstruction: ImageBatch, data_range: float = 255.0) -> torch.Tensor:
    """Per-image multi-scale SSIM over five scales (Wang et al. 2003), needing at least 176 pixels a side."""
    a, b = _as_float_nchw(reference), _as_float_nchw(reconstruction)
    smallest = 11 * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # the 11-pixel window must fit at the coarsest scale
    if min(a.shape[-2:]) < smallest:
        raise ValueError(f"MS-SSIM needs images of at least {smallest}x{smallest} pixels, got {tuple(a.shape[-2:])}")
    values = []
    for scale, _weight in enumerate(MS_SSIM_WEIGHTS):
        ssim_value, cs_value = _ssim_maps(a, b, data_range)
        last = scale == len(MS_SSIM_WEIGHTS) - 1
        values.append((ssim_value if last else cs_value).clamp_min(0.0))
        if not last:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64)
    return torch.prod(torch.stack(values, dim=1) ** weights, dim=1)
