"""The embedded default codec, shipped inside the package so that `--model builtin` needs no download.

It is an ordinary diffusers folder (config.json + diffusion_pytorch_model.safetensors) with an ABOUT.md
that says how it was trained; `codec info` prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from codec.checkpoint import CheckpointError

if TYPE_CHECKING:
    import torch

    from codec.model import AutoencoderKL

BUILTIN_DIR = Path(__file__).parent / "assets" / "builtin"


def load_builtin(cls: type[AutoencoderKL], torch_dtype: torch.dtype | None = None) -> AutoencoderKL:
    from codec.weights import load_folder

    if not (BUILTIN_DIR / "config.json").is_file():
        raise CheckpointError(
            f"{BUILTIN_DIR}: the embedded model is not in this installation; pass --model with a diffusers "
            "folder, a single file or a hub id"
        )
    model = load_folder(cls, BUILTIN_DIR, variant=None, torch_dtype=torch_dtype)
    about = BUILTIN_DIR / "ABOUT.md"
    model.about = about.read_text() if about.is_file() else "the embedded latent-codec model"
    return model
