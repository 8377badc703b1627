"""Other diffusers image autoencoders, run through diffusers' own classes for `codec bench` and `codec roundtrip`.

A folder whose config.json names one of SUPPORTED (TAESD's AutoencoderTiny, SANA's DC-AE, Qwen-Image's and Wan's
video VAEs on one frame, the consistency decoder, HunyuanImage's VAE) loads here, behind what those commands use:
an image in [-1, 1] -> a latent (B, C, h, w) -> an image. Our own AutoencoderKL and AutoencoderKLFlux2 keep their
native path; any other class is refused with the list of those that run.

Weights are read from safetensors only (`use_safetensors=True`): a pickled .bin can carry code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from codec.checkpoint import CheckpointError
from codec.config import CONFIG_NAME, FLUX2_CLASS_NAME

NATIVE = ("AutoencoderKL", FLUX2_CLASS_NAME)


@dataclass(frozen=True)
class Kind:
    """How a class takes an image: as one frame of a video (B, C, 1, H, W), and whether its decoder draws noise."""

    frames: bool = False
    noisy_decoder: bool = False


SUPPORTED = {
    "AutoencoderTiny": Kind(),
    "AutoencoderDC": Kind(),
    "AutoencoderKLHunyuanImage": Kind(),
    "AutoencoderKLQwenImage": Kind(frames=True),
    "AutoencoderKLWan": Kind(frames=True),
    "ConsistencyDecoderVAE": Kind(noisy_decoder=True),
}


def config_folder(spec: str | os.PathLike) -> Path | None:
    """The folder holding a model's config.json (a pipeline's vae/ where the root has none), or None."""
    path = Path(str(spec)).expanduser()
    if not path.is_dir():
        return None
    if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
        path = path / "vae"
    return path if (path / CONFIG_NAME).is_file() else None


def class_name_of(folder: Path) -> str | None:
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder / CONFIG_NAME}: unreadable config ({error})") from None
    return data.get("_class_name") if isinstance(data, dict) else None


def is_foreign(spec: str | os.PathLike) -> bool:
    """Whether `spec` is a folder of another diffusers autoencoder (supported or not: load_foreign says which)."""
    folder = config_folder(spec)
    return folder is not None and class_name_of(folder) not in (None, *NATIVE)


def check_supported(spec: str | os.PathLike) -> None:
    """Refuse, before any work, a folder of a diffusers autoencoder that neither we nor SUPPORTED run."""
    folder = config_folder(spec)
    class_name = class_name_of(folder) if folder is not None else None
    if class_name in (None, *NATIVE, *SUPPORTED):
        return
    raise CheckpointError(
        f"{folder / CONFIG_NAME}: describes a {class_name!r}, which `codec bench` and `codec roundtrip` do not run; "
        f"they run {' and '.join(NATIVE)} natively and, through diffusers, {', '.join(SUPPORTED)}"
    )


class ForeignAutoencoder:
    """A diffusers autoencoder as the commands use one: `encode_latent`, `decode_latent`, and a call that
    reconstructs (returning an object with `.sample`, as our model's forward)."""

    def __init__(self, model: torch.nn.Module, class_name: str, source: str) -> None:
        self.model, self.class_name, self.source = model.eval(), class_name, source
        self.kind = SUPPORTED[class_name]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        config = self.model.config  # z_dim: Qwen-Image's and Wan's name for it
        return int(config.get("latent_channels") or config["z_dim"])

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent value along a side."""
        ratio = getattr(self.model, "spatial_compression_ratio", None)
        if ratio:
            return int(ratio)
        config = self.model.config  # AutoencoderTiny and the consistency decoder: one halving per block after the first
        return 2 ** (len(config["encoder_block_out_channels"]) - 1)

    def to(self, *args, **kwargs) -> ForeignAutoencoder:
        self.model.to(*args, **kwargs)
        return self

    def eval(self) -> ForeignAutoencoder:
        self.model.eval()
        return self

    def parameters(self):
        return self.model.parameters()

    def enable_tiling(self, tile: int | None = None) -> None:
        """diffusers' own tiling of the class, at its own tile size; `tile` is for our models' tiling."""
        if not hasattr(self.model, "enable_tiling"):
            raise ValueError(f"{self.source}: diffusers' {self.class_name} has no tiling")
        self.model.enable_tiling()

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the posterior mode or the latent (B, C, h, w), the image padded to the
        factor (replicated edges)."""
        x = x.to(self.device, self.dtype)
        f = self.downsample_factor
        pad_h, pad_w = -x.shape[-2] % f, -x.shape[-1] % f
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.model.encode(x[:, :, None] if self.kind.frames else x)
        if hasattr(out, "latent_dist"):
            z = out.latent_dist.mode()
        else:  # AutoencoderTiny's `latents`, AutoencoderDC's `latent`
            z = out.latents if hasattr(out, "latents") else out.latent
        return z[:, :, 0] if self.kind.frames else z

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, h * f, w * f) in about [-1, 1]."""
        z = z.to(self.device, self.dtype)
        if self.kind.noisy_decoder:  # seeded, so that a benchmark decodes the same every run
            generator = torch.Generator(self.device).manual_seed(0)
            return self.model.decode(z, generator=generator).sample
        sample = self.model.decode(z[:, :, None] if self.kind.frames else z).sample
        return sample[:, :, 0] if self.kind.frames else sample

    def __call__(self, x: torch.Tensor):
        from codec.model import DecoderOutput

        y = self.decode_latent(self.encode_latent(x))
        return DecoderOutput(y[..., : x.shape[-2], : x.shape[-1]])

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return (
            f"diffusers {self.class_name} (run through diffusers' own class): {params / 1e6:.2f}M parameters, "
            f"{self.latent_channels}-channel latent, factor {self.downsample_factor}"
        )


def load_foreign(spec: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> ForeignAutoencoder:
    """The diffusers autoencoder in folder `spec`; a class outside SUPPORTED is refused, naming those that run."""
    folder = config_folder(spec)
    if folder is None:
        raise CheckpointError(f"{spec}: no folder with a config.json")
    check_supported(spec)
    class_name = class_name_of(folder)
    import diffusers

    try:
        model = getattr(diffusers, class_name).from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{folder}: diffusers could not load its {class_name} ({first})") from None
    return ForeignAutoencoder(model, class_name, str(spec))
