"""The embedded default codec, shipped inside the package so that `--model builtin` needs no download.

It is an ordinary diffusers folder (config.json + diffusion_pytorch_model.safetensors) with an ABOUT.md
that says how it was trained; `codec info` prints it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from codec.checkpoint import CheckpointError, LoadedWeights
from codec.weights import read_folder

BUILTIN_DIR = Path(__file__).parent / "assets" / "builtin"


def read_builtin() -> LoadedWeights:
    if not (BUILTIN_DIR / "config.json").is_file():
        raise CheckpointError(
            f"{BUILTIN_DIR}: the embedded model is not in this installation; pass --model with a diffusers "
            "folder, a single file or a hub id"
        )
    loaded = read_folder(BUILTIN_DIR, variant=None)
    about = BUILTIN_DIR / "ABOUT.md"
    text = about.read_text() if about.is_file() else "the embedded latent-codec model"
    return dataclasses.replace(loaded, provenance=dataclasses.replace(loaded.provenance, about=text))
