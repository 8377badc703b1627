"""Reconstruction metrics on 8-bit images, as the SD VAE model cards report them.

Inputs are uint8-valued tensors or arrays (B, H, W, 3) or (B, 3, H, W) float in [0, 255]: metrics are taken
after quantisation to 8 bits, because that is the image a user saves and sees.

Every metric works through the image in bands of rows, converting one band at a time, so the memory it needs
beyond its inputs stays a few tens of MB whatever the image's size (a whole-image float copy would take GBs).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# uint8 or float, (H, W, 3), (B, H, W, 3) or (B, 3, H, W), as numpy arrays or tensors.
ImageBatch = torch.Tensor | np.ndarray

BAND_VALUES = 1 << 17  # values of one band (all images and channels of it): 1 MB in float64, cache-sized
MIN_BAND_ROWS = 32  # however wide the image: SSIM reads 10 rows of the next band again, which must stay a few
SSIM_MIN_SIDE = 11  # one Gaussian window
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _as_nchw(images: ImageBatch) -> torch.Tensor:
    """A (B, C, H, W) view of the input, in its own dtype: converted band by band, never whole."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x


def _bands(rows: int, values_per_row: int, overlap: int = 0) -> list[tuple[int, int]]:
    """(start, stop) of bands covering `rows` output rows, each (with `overlap` more input rows) about BAND_VALUES."""
    step = max(MIN_BAND_ROWS, BAND_VALUES // max(1, values_per_row) - overlap)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def psnr(reference: ImageBatch, reconstruction: ImageBatch, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR in dB; identical images give +inf."""
    a, b = _as_nchw(reference), _as_nchw(reconstruction)
    squared = torch.zeros(a.shape[0], dtype=torch.float64)
    for start, stop in _bands(a.shape[-2], a.shape[0] * a.shape[1] * a.shape[-1]):
        difference = a[..., start:stop, :].double() - b[..., start:stop, :].double()
        squared += difference.square().flatten(1).sum(1)
    mse = squared / a[0].numel()
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int = SSIM_MIN_SIDE, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    return g / g.sum()


def _channel_means(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean over the whole batch, in float64, a band at a time."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for start, stop in _bands(x.shape[-2], x.shape[0] * x.shape[1] * x.shape[-1]):
        total += x[..., start:stop, :].double().sum(dim=(0, 2, 3))
    return total / (x.shape[0] * x.shape[-2] * x.shape[-1])


def _ssim_band(x: torch.Tensor, y: torch.Tensor, offset: torch.Tensor, data_range: float):
    """Per-image sums of SSIM and contrast-structure over one band's valid 11x11 windows (sigma 1.5).

    `x`, `y` are one channel's rows, centred on `offset` first: float32 then keeps E[x^2] - E[x]^2 accurate for
    0..255 data. The window is applied as two 1-D passes."""
    g = _gaussian_window().to(torch.float32)
    rows, cols = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, rows), cols)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = (x.double() - offset).float(), (y.double() - offset).float()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cs = (2 * (blur(x * y) - mu_x * mu_y) + c2) / (var_x + var_y + c2)
    mu_x, mu_y = mu_x + offset.float(), mu_y + offset.float()
    luminance = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)
    return (luminance * cs).double().flatten(1).sum(1), cs.double().flatten(1).sum(1)


def _ssim_maps(a: torch.Tensor, b: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and contrast-structure over the valid region of an 11x11 Gaussian window, channel by
    channel and band by band: a band's windows need 10 rows of the next band's, read again."""
    halo = SSIM_MIN_SIDE - 1
    height, width = a.shape[-2] - halo, a.shape[-1] - halo
    offsets = _channel_means(a)
    ssim_sums = torch.zeros(a.shape[0], dtype=torch.float64)
    cs_sums = torch.zeros(a.shape[0], dtype=torch.float64)
    for channel in range(a.shape[1]):
        for start, stop in _bands(height, a.shape[0] * a.shape[-1], overlap=halo):
            rows = slice(start, stop + halo)
            ssim_part, cs_part = _ssim_band(
                a[:, channel : channel + 1, rows], b[:, channel : channel + 1, rows], offsets[channel], data_range
            )
            ssim_sums += ssim_part
            cs_sums += cs_part
    count = a.shape[1] * height * width
    return ssim_sums / count, cs_sums / count


def ssim(reference: ImageBatch, reconstruction: ImageBatch, data_range: float = 255.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; Gaussian window as scikit-image's gaussian_weights=True)."""
    a, b = _as_nchw(reference), _as_nchw(reconstruction)
    if min(a.shape[-2:]) < SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    return _ssim_maps(a, b, data_range)[0]


def _halve(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling, a band at a time, kept in float32 (exact for 8-bit data through the five scales)."""
    out = torch.empty(*x.shape[:2], x.shape[-2] // 2, x.shape[-1] // 2, dtype=torch.float32)
    for start, stop in _bands(out.shape[-2], 2 * x.shape[0] * x.shape[1] * x.shape[-1]):
        out[..., start:stop, :] = F.avg_pool2d(x[..., 2 * start : 2 * stop, :].double(), 2).float()
    return out


def ms_ssim(reference: ImageBatch, reconstruction: ImageBatch, data_range: float = 255.0) -> torch.Tensor:
    """Per-image multi-scale SSIM over five scales (Wang et al. 2003), needing at least 176 pixels a side."""
    a, b = _as_nchw(reference), _as_nchw(reconstruction)
    smallest = 11 * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # the 11-pixel window must fit at the coarsest scale
    if min(a.shape[-2:]) < smallest:
        raise ValueError(f"MS-SSIM needs images of at least {smallest}x{smallest} pixels, got {tuple(a.shape[-2:])}")
    values = []
    for scale, _weight in enumerate(MS_SSIM_WEIGHTS):
        ssim_value, cs_value = _ssim_maps(a, b, data_range)
        last = scale == len(MS_SSIM_WEIGHTS) - 1
        values.append((ssim_value if last else cs_value).clamp_min(0.0))
        if not last:
            a, b = _halve(a), _halve(b)
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64)
    return torch.prod(torch.stack(values, dim=1) ** weights, dim=1)
