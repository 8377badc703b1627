"""Scoring one reconstruction: save it, take every metric, keep its Inception features for rFID.

Metrics are on 8-bit images (the reconstruction as a PNG stores it), so a benchmark figure is what a user sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from codec.atomic import atomic_path
from codec.bench.fid import InceptionFeatures
from codec.bench.perceptual import LPIPSMetric
from codec.metrics import SSIM_MIN_SIDE, ms_ssim, psnr, ssim

MS_SSIM_MIN_SIDE = 176  # five scales of an 11-pixel window
REFERENCE = "reference"  # the feature key, and folder, of the original images


def save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread for small per-image work: waking and synchronising more costs far more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def image_metrics(reference: np.ndarray, reconstruction: np.ndarray) -> dict[str, float | None]:
    """PSNR (dB), SSIM (None under 11 pixels a side) and MS-SSIM (None under 176) of one uint8 pair."""
    if reference.shape != reconstruction.shape:
        raise ValueError(f"reconstruction shape {reconstruction.shape} differs from the image's {reference.shape}")
    with single_thread():
        result: dict[str, float | None] = {
            "psnr": float(psnr(reference, reconstruction)[0]),
            "ssim": None,
            "ms_ssim": None,
        }
        if min(reference.shape[:2]) >= SSIM_MIN_SIDE:
            result["ssim"] = float(ssim(reference, reconstruction)[0])
        if min(reference.shape[:2]) >= MS_SSIM_MIN_SIDE:
            result["ms_ssim"] = float(ms_ssim(reference, reconstruction)[0])
    return result


class Scorer:
    """Scores reconstructions row by row; holds the LPIPS networks and the Inception features collected so far."""

    def __init__(
        self, output: Path, lpips_metrics: list[LPIPSMetric], inception: InceptionFeatures | None, batch: int = 16
    ) -> None:
        self.output, self.lpips_metrics, self.inception, self.batch = output, lpips_metrics, inception, batch
        self.features: dict[str, list[np.ndarray]] = {}
        self._pending: dict[str, list[np.ndarray]] = {}

    def reference_path(self, image: str) -> Path:
        return self.output / REFERENCE / f"{image}.png"

    def reconstruction_path(self, folder: str, image: str) -> Path:
        return self.output / "reconstructions" / folder / f"{image}.png"

    def add_features(self, key: str, array: np.ndarray) -> None:
        if self.inception is None:
            return
        pending = self._pending.setdefault(key, [])
        pending.append(array)
        if len(pending) >= self.batch:
            self.flush(key)

    def flush(self, key: str) -> None:
        pending = self._pending.pop(key, [])
        if pending and self.inception is not None:
            self.features.setdefault(key, []).extend(self.inception(pending))

    def score(self, key: str, folder: str, image: str, reference: np.ndarray, recon: np.ndarray) -> dict:
        """Save `recon` as reconstructions/FOLDER/IMAGE.png and return its metrics."""
        save_png(recon, self.reconstruction_path(folder, image))
        try:
            record = image_metrics(reference, recon)
            for metric in self.lpips_metrics:
                record[f"lpips_{metric.net}"] = metric(reference, recon)
        except (ValueError, RuntimeError) as error:  # say which image, not only what went wrong
            raise ValueError(f"{image} ({folder}): scoring failed: {error}") from error
        self.add_features(key, recon)
        return record
