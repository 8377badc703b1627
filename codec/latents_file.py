"""The latents file that `codec encode` writes and `codec decode` reads: one safetensors file holding each image's
scaled latent and, in its string metadata, how they were scaled and what they came from. The schema, its
versions and the meaning of every key are in docs/latents-file.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from codec.atomic import atomic_path

if TYPE_CHECKING:
    from codec.config import AutoencoderKLConfig

FORMAT_VERSION = 1
VERSION_KEY = "codec_latents_version"
# Scaled latents are near unit variance: a value this far out is damage or another tool's data, and decodes to
# nothing (values near 1e19 overflow float32 inside the decoder and come out black).
MAX_ABS_LATENT = 1e4
NOT_OURS = "not a latents file written by `codec encode`"


class LatentsFileError(ValueError):
    """A latents file that cannot be read or does not describe its tensors; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Scaling:
    """How raw latents became the stored ones (see `codec.model.scale_latents`)."""

    scaling_factor: float
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def of(cls, config: AutoencoderKLConfig) -> Scaling:
        mean, std = config.latents_mean, config.latents_std
        return cls(
            float(config.scaling_factor),
            float(config.shift_factor or 0.0),
            tuple(mean) if mean is not None else None,
            tuple(std) if std is not None else None,
        )

    def as_config_fields(self) -> dict:
        """The fields to `dataclasses.replace` into a model's config to unscale with these values."""
        return {
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": self.latents_mean,
            "latents_std": self.latents_std,
        }


@dataclasses.dataclass(frozen=True)
class LatentsFile:
    """One latent per image, (channels, height, width) float32, with what decoding each needs."""

    latents: list[torch.Tensor]
    scaling: Scaling
    sources: list[str]  # each image's file name, without its folder
    sizes: list[tuple[int, int]]  # each image's (height, width) before padding to the codec's factor
    model: str | None = None  # the --model that encoded them; a local one as an absolute path
    posterior: str = "mean"  # "mean" or "sample"
    files: list[tuple[int, int]] | None = None  # each source's (device, inode): decode never writes over one
    latent_norm: dict | None = None  # FLUX.2: the batch-norm statistics of its patched latents (codec.latent_norm)


def file_id(path: str | os.PathLike) -> tuple[int, int]:
    """A file's identity by device and inode: links, bind mounts and case-insensitive names still match."""
    stat = Path(path).stat()
    return (stat.st_dev, stat.st_ino)


def recorded_model_name(spec: str) -> str:
    """A local model by its absolute path, so `codec decode` finds it from another folder; other specs as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def write_latents_file(path: str | os.PathLike, record: LatentsFile) -> None:
    """Write `record` atomically (a crash leaves the old file or none, never half of one)."""
    from safetensors.torch import save_file

    scaling = record.scaling
    tensors = {f"latent.{i}": latent.detach().float().cpu().contiguous() for i, latent in enumerate(record.latents)}
    metadata = {
        "format": "pt",
        VERSION_KEY: str(FORMAT_VERSION),
        "scaling_factor": repr(scaling.scaling_factor),
        "shift_factor": repr(scaling.shift_factor),
        "latents_mean": json.dumps(list(scaling.latents_mean) if scaling.latents_mean is not None else None),
        "latents_std": json.dumps(list(scaling.latents_std) if scaling.latents_std is not None else None),
        "sources": json.dumps(record.sources),
        "sizes": json.dumps([list(size) for size in record.sizes]),
        "files": json.dumps([list(f) for f in record.files or []]),
        "model": record.model or "",
        "posterior": record.posterior,
    }
    if record.latent_norm is not None:
        metadata["latent_norm"] = json.dumps(record.latent_norm)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_latents_file(path: str | os.PathLike) -> LatentsFile:
    """Read and check a latents file: every tensor finite and within MAX_ABS_LATENT, the metadata describing them."""
    from codec.checkpoint import CheckpointError, is_safetensors, read_checkpoint

    path = Path(path)
    if path.is_file() and not is_safetensors(path):
        raise LatentsFileError(f"{path}: {NOT_OURS} (not a safetensors file)")
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        raise LatentsFileError(str(error)) from None
    metadata = checkpoint.metadata
    _check_version(path, metadata)
    try:
        latents = [checkpoint.tensors[f"latent.{i}"] for i in range(len(checkpoint.tensors))]
        record = LatentsFile(
            latents=latents,
            scaling=_read_scaling(metadata),
            sources=json.loads(metadata["sources"]),
            sizes=json.loads(metadata["sizes"]),
            model=metadata.get("model") or None,
            posterior=metadata.get("posterior", "mean"),
            files=[tuple(f) for f in json.loads(metadata.get("files", "[]"))],  # older files lack them
            latent_norm=json.loads(metadata["latent_norm"]) if "latent_norm" in metadata else None,
        )
    except KeyError as error:
        raise LatentsFileError(f"{path}: {NOT_OURS} (missing {error})") from None
    except (ValueError, TypeError) as error:
        raise LatentsFileError(f"{path}: {NOT_OURS} ({error})") from None
    _check_latents(path, record)
    _check_scaling(path, record.scaling, int(record.latents[0].shape[0]))
    return dataclasses.replace(record, sizes=[(height, width) for height, width in record.sizes])


def _check_version(path: Path, metadata: dict[str, str]) -> None:
    text = metadata.get(VERSION_KEY, "1")  # files written before the key existed are version 1
    if not text.isdigit():
        raise LatentsFileError(f"{path}: {NOT_OURS} ({VERSION_KEY} is {text!r}, not a whole number)")
    version = int(text)
    if version > FORMAT_VERSION:
        raise LatentsFileError(
            f"{path}: latents file format version {version}, newer than this codec reads ({FORMAT_VERSION}); "
            "upgrade codec to decode it"
        )


def _read_scaling(metadata: dict[str, str]) -> Scaling:
    def channels(text: str | None) -> tuple[float, ...] | None:
        value = json.loads(text) if text else None
        return tuple(float(v) for v in value) if value is not None else None

    return Scaling(
        float(metadata["scaling_factor"]),
        float(metadata["shift_factor"]),
        channels(metadata.get("latents_mean")),  # older files lack them: plain scaling
        channels(metadata.get("latents_std")),
    )


def _check_latents(path: Path, record: LatentsFile) -> None:
    """The metadata must describe the tensors: a file edited or written by another tool fails here, by name."""
    latents, sources, sizes = record.latents, record.sources, record.sizes
    if not latents:
        raise LatentsFileError(f"{path}: holds no latents")
    if not isinstance(sources, list) or len(sources) != len(latents) or not all(isinstance(s, str) for s in sources):
        raise LatentsFileError(f"{path}: its 'sources' metadata is not one file name per latent ({len(latents)})")
    if not isinstance(sizes, list) or len(sizes) != len(latents):
        raise LatentsFileError(f"{path}: its 'sizes' metadata is not one [height, width] per latent ({len(latents)})")
    for index, (latent, size) in enumerate(zip(latents, sizes, strict=True)):
        whole = isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)
        if latent.dim() != 3 or not latent.is_floating_point() or min(latent.shape) < 1 or not whole:
            raise LatentsFileError(
                f"{path}: latent.{index} is not a (channels, height, width) latent with its image size "
                f"(shape {tuple(latent.shape)}, size {size!r})"
            )
        if not torch.isfinite(latent).all():
            raise LatentsFileError(f"{path}: latent.{index} ({sources[index]}) holds NaN or infinite values")
        largest = latent.abs().max().item()
        if largest > MAX_ABS_LATENT:
            raise LatentsFileError(
                f"{path}: latent.{index} ({sources[index]}) holds values up to {largest:.3g}, where scaled latents "
                f"stay far below {MAX_ABS_LATENT:g}: the file is damaged or was not written by `codec encode`"
            )
    if len({int(latent.shape[0]) for latent in latents}) > 1:
        raise LatentsFileError(f"{path}: its latents differ in channel count")


def _check_scaling(path: Path, scaling: Scaling, channels: int) -> None:
    """Values that would unscale to nonsense are named with the file, before any model is loaded."""
    if not (math.isfinite(scaling.scaling_factor) and scaling.scaling_factor > 0):
        raise LatentsFileError(f"{path}: its scaling_factor must be a positive number, got {scaling.scaling_factor}")
    if not math.isfinite(scaling.shift_factor):
        raise LatentsFileError(f"{path}: its shift_factor must be a finite number, got {scaling.shift_factor}")
    for name in ("latents_mean", "latents_std"):
        values = getattr(scaling, name)
        if values is None:
            continue
        if len(values) != channels or not all(math.isfinite(v) for v in values):
            raise LatentsFileError(
                f"{path}: its {name} must be {channels} finite numbers, one per latent channel; got {list(values)}"
            )
    if scaling.latents_std is not None and min(scaling.latents_std) <= 0:
        raise LatentsFileError(f"{path}: its latents_std must be positive, got {list(scaling.latents_std)}")
