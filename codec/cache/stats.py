"""Latent statistics: per-channel mean and std of z over a cache, and the scaling factor 1 / std.

This is how SD's 0.18215 was chosen: the std of the encoder's latents over training images, so that the scaled
latents a diffusion model sees have unit variance. With `posterior="sample"` (the default) the statistics are
those of z ~ N(mean, std), computed exactly rather than by drawing: E[z] = E[mean], E[z^2] = E[mean^2] + E[var].
Sums are float64, taken around the first values seen, so a large mean does not cancel the variance away.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from codec.atomic import atomic_path
from codec.cache import shards
from codec.cache.manifest import read_manifest
from codec.config import CONFIG_NAME, FLUX2_CLASS_NAME, AutoencoderKLConfig
from codec.latent_norm import from_record, patchify


class LatentStats:
    """Running per-channel sums over latents of shape (C, h, w)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.count = 0  # values per channel
        self.images = 0
        self.reference: np.ndarray | None = None
        self.sum = np.zeros(channels)
        self.sum_squares = np.zeros(channels)

    def add(self, mean: np.ndarray, logvar: np.ndarray | None = None) -> None:
        """One latent's posterior mean (C, h, w), and its logvar to count the sampling noise."""
        values = np.asarray(mean, dtype=np.float64).reshape(self.channels, -1)
        if self.reference is None:
            self.reference = values.mean(axis=1)
        centred = values - self.reference[:, None]
        self.sum += centred.sum(axis=1)
        self.sum_squares += np.square(centred).sum(axis=1)
        if logvar is not None:
            self.sum_squares += np.exp(np.asarray(logvar, dtype=np.float64).reshape(self.channels, -1)).sum(axis=1)
        self.count += values.shape[1]
        self.images += 1

    def result(self) -> dict:
        if not self.count:
            raise ValueError("no latents to compute statistics over")
        offset = self.sum / self.count
        channel_mean = self.reference + offset
        channel_var = np.maximum(self.sum_squares / self.count - offset**2, 0.0)
        mean = float(channel_mean.mean())  # every channel has the same count
        std = math.sqrt(float((channel_var + (channel_mean - mean) ** 2).mean()))
        return {
            "images": self.images,
            "values_per_channel": self.count,
            "latents_mean": channel_mean.tolist(),
            "latents_std": np.sqrt(channel_var).tolist(),
            "mean": mean,
            "std": std,
            "scaling_factor": 1.0 / std,  # as SD: scaled latents z * scaling_factor have unit std
            "shift_factor": mean,  # as SD3/FLUX, for (z - shift_factor) * scaling_factor
        }


def cache_stats(root: str | Path, posterior: str = "sample", progress: bool = True) -> dict:
    """Statistics over every row of a finished cache (mirrored copies left out: they would count images twice).
    `progress` shows a bar on stderr, where that is a terminal."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None or not manifest.get("complete"):
        raise shards.CacheError(f"{root}: not a finished cache (no complete manifest.json)")
    norm = _recorded_norm(manifest, root)
    patch = norm.patch_size if norm is not None else (1, 1)  # FLUX.2: statistics of the patched latents
    stats = LatentStats(manifest["codec"]["latent_channels"] * patch[0] * patch[1])
    bf16 = manifest["storage"]["latent_dtype"] == "bf16"
    with tqdm(total=manifest["counts"]["rows"], desc="stats", unit="row", disable=None if progress else True) as bar:
        for entry in manifest["shards"]:
            bar.update(_add_shard(stats, root / entry["file"], bf16, posterior == "sample", patch))
    result = stats.result()
    if norm is not None:  # what FLUX.2's bn holds: running_var is the variance of z, not of its mean
        result["latent_norm"] = {
            **norm.record(),
            "running_mean": result["latents_mean"],
            "running_var": [std**2 for std in result["latents_std"]],
        }
    # Enlarged images blur the statistics: their count is in the shards' footers (0 for shards that predate it).
    upscaled = sum((shards.read_shard_meta(root / e["file"]) or {}).get("upscaled", 0) for e in manifest["shards"])
    result.update(posterior=posterior, cache=str(root), identity=manifest["codec"]["identity"], upscaled=upscaled)
    result.update(rows=manifest["counts"]["rows"], resolution=manifest["preprocessing"].get("resolution"))
    return result


def _add_shard(stats: LatentStats, path: Path, bf16: bool, with_logvar: bool, patch: tuple[int, int]) -> int:
    """Every row of one shard into `stats` (FLUX.2's: its 2x2 patches as channels); returns the number of rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["shape", "mean", "logvar"])
    shapes = shards.fixed_width_rows(table.column("shape"), 3, np.int64)
    columns = [shards.latent_arrays(table.column(name)) for name in ("mean", "logvar")]
    if bf16:
        columns = [(offsets, shards.bf16_to_float32(values)) for offsets, values in columns]
    (offsets, means), (_, logvars) = columns
    for row, shape in enumerate(shapes):
        span = slice(offsets[row], offsets[row + 1])
        mean, logvar = means[span].reshape(shape), logvars[span].reshape(shape)
        if patch != (1, 1):
            mean, logvar = (patchify(torch.from_numpy(v.copy()), patch).numpy() for v in (mean, logvar))
        stats.add(mean, logvar if with_logvar else None)
    return len(shapes)


def _recorded_norm(manifest: dict, root: Path):
    record = manifest["codec"].get("latent_norm")
    if record is None:
        return None
    try:
        return from_record(record)
    except ValueError as error:
        raise shards.CacheError(f"{root}: manifest codec.latent_norm: {error}") from None


def write_config(model_dir: str | Path, result: dict, channel_stats: bool = False) -> Path:
    """Put the measured scaling into a diffusers folder's config.json, atomically: `scaling_factor = 1 / std`, or
    with `channel_stats` per-channel `latents_mean`/`latents_std` and `scaling_factor` 1.0.

    Two conventions, one per kind of pipeline, and a config may follow only one: diffusers' SD 1.x-style pipelines
    read scaling_factor alone, its SDXL pipelines `(z - latents_mean) * scaling_factor / latents_std` whenever
    latents_mean is set. Both fields beside a 1/std scaling factor would scale twice in the second kind, so the
    default writes the scaling factor and clears the per-channel fields. The other keys are kept as they were;
    the codec's identity leaves these fields out, so caches made with this model stay valid.
    """
    folder = Path(model_dir)
    if not (folder / CONFIG_NAME).is_file() and (folder / "vae" / CONFIG_NAME).is_file():
        folder = folder / "vae"  # a pipeline: its VAE lives in vae/
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the config ({error})") from None
    if isinstance(data, dict) and data.get("_class_name") == FLUX2_CLASS_NAME:
        return _write_batch_norm(folder, result)
    if channel_stats:
        data.update(
            latents_mean=[round(v, 6) for v in result["latents_mean"]],
            latents_std=[round(v, 6) for v in result["latents_std"]],
            scaling_factor=1.0,
        )
    else:
        data.update(latents_mean=None, latents_std=None, scaling_factor=round(result["scaling_factor"], 6))
    AutoencoderKLConfig.from_dict(data, source=str(path), strict=False)  # refuse to write one that would not load
    mode = path.stat().st_mode & 0o777
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.chmod(mode)  # as it was: the temporary file would otherwise leave it 0600
    return path


def _write_batch_norm(folder: Path, result: dict) -> Path:
    """FLUX.2 keeps its statistics in its weights (bn.running_mean, bn.running_var), where diffusers reads them:
    they are replaced in the weights file, atomically, every other tensor and the file's metadata kept as they were.
    The codec's identity leaves them out, so caches made with this model stay valid."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from codec.checkpoint import read_tensors

    record = result.get("latent_norm")
    if record is None:
        raise ValueError(f"{folder}: a {FLUX2_CLASS_NAME}, but these are not statistics of its patched latents")
    path = folder / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise ValueError(f"{path}: no such file; FLUX.2's statistics are written into one safetensors weights file")
    tensors = read_tensors(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    for key in ("running_mean", "running_var"):
        old = tensors.get(f"bn.{key}")
        if old is None or old.numel() != len(record[key]):
            raise ValueError(f"{path}: no bn.{key} of {len(record[key])} values to replace")
        tensors[f"bn.{key}"] = torch.tensor(record[key], dtype=old.dtype)
    mode = path.stat().st_mode & 0o777
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(mode)
    return path
