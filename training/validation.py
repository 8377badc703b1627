"""Validation: loss terms and PSNR on held-out images (center crops), and a grid of originals over reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch

from codec.atomic import atomic_path
from codec.distributions import DiagonalGaussianDistribution
from codec.images import tensor_to_pil, tensor_to_uint8
from codec.metrics import psnr
from codec.visual import grid

GRID_IMAGES = 8


@torch.no_grad()
def validate(accelerator, vae, loader, pixel_loss, lpips_loss) -> tuple[dict[str, float], list]:
    """Mean metrics over the validation set (gathered across processes) and a few (original, recon) pairs."""
    vae.eval()
    totals: dict[str, list[torch.Tensor]] = {"psnr": [], "pixel": [], "kl": []}
    if lpips_loss is not None:
        totals["lpips"] = []
    samples = []
    valid_rows = []
    for batch in loader:
        # Unreadable images are blank rows with valid=False rather than dropped: every process gathers batches of
        # one shape, and a process with nothing to gather would leave the others waiting.
        pixels, valid = batch["pixels"], batch["valid"]
        valid_rows.append(accelerator.gather_for_metrics(valid.to(pixels.device)))
        moments = vae.encode_moments(pixels)
        posterior = DiagonalGaussianDistribution(moments)
        reconstruction = vae.decode_raw(posterior.mode()).clamp(-1, 1)
        values = {
            "psnr": psnr(tensor_to_uint8(pixels), tensor_to_uint8(reconstruction)).float(),
            "pixel": (reconstruction - pixels).abs().flatten(1).mean(1)
            if pixel_loss.kind == "l1"
            else (reconstruction - pixels).square().flatten(1).mean(1),
            "kl": posterior.kl(),
        }
        if lpips_loss is not None:
            values["lpips"] = lpips_loss.lpips(reconstruction.float(), pixels.float()).flatten()
        for key, value in values.items():
            totals[key].append(accelerator.gather_for_metrics(value.to(pixels.device).float()))
        if len(samples) < GRID_IMAGES:
            keep = valid.cpu()
            samples.extend(zip(pixels.cpu()[keep], reconstruction.cpu()[keep], strict=True))
    if not valid_rows:
        return {}, []
    valid = torch.cat(valid_rows).bool()
    metrics = {key: torch.cat(parts)[valid].mean().item() for key, parts in totals.items() if parts and valid.any()}
    return metrics, samples[:GRID_IMAGES]


def collate_validation(batch: list[torch.Tensor | None], resolution: int) -> dict[str, torch.Tensor]:
    """{"pixels": (B, 3, R, R) with unreadable images blank, "valid": (B,) bool}."""
    blank = torch.zeros(3, resolution, resolution)
    return {
        "pixels": torch.stack([blank if pixels is None else pixels for pixels in batch]),
        "valid": torch.tensor([pixels is not None for pixels in batch]),
    }


def save_grid(samples: list, path: Path, title: str) -> None:
    """Originals above their reconstructions, one column per image."""
    if not samples:
        return
    originals = tensor_to_pil(torch.stack([s[0] for s in samples]))
    reconstructions = tensor_to_pil(torch.stack([s[1] for s in samples]))
    picture = grid([originals, reconstructions], [title] + [""] * (len(samples) - 1))
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
