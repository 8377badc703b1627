"""What a user names after --model, read into the weights to build: 'builtin', 'preset:NAME' (random weights), a
diffusers folder, a single file or a hub id. AutoencoderKL.load builds the model from what this returns."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from codec.builtin import read_builtin
from codec.checkpoint import CheckpointError, LoadedWeights, Provenance
from codec.config import PRESETS, preset
from codec.single_file import read_single_file
from codec.weights import SINGLE_FILE_SUFFIXES, check_spec, read_pretrained

log = logging.getLogger(__name__)


def read_model(spec: str | os.PathLike) -> LoadedWeights:
    text = str(spec)
    if text == "builtin":
        return read_builtin()
    if text.startswith("preset:"):
        name = text.split(":", 1)[1]
        if name not in PRESETS:
            raise CheckpointError(f"{text}: unknown preset; choose one of {', '.join(PRESETS)}")
        log.warning("%s: randomly initialised weights (seed 0), for testing only", text)
        return LoadedWeights(preset(name), None, Provenance(text))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(f"{path}: not a checkpoint; expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")
        return read_single_file(path)
    check_spec(spec)  # what cannot be found here nor on the hub, said as for any --model
    return read_pretrained(text)
