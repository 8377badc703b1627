"""Reading tensors from checkpoint files and loading them into a model only after every key and shape checks."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and why."""


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, or of a pickled `.ckpt`/`.bin`/`.pt` read with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors file, perhaps truncated or corrupt ({error})"
            ) from None
    try:
        # weights_only refuses arbitrary pickled code: a checkpoint from the internet must not run programs.
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    # Garbage bytes reach the unpickler in many ways (UnpicklingError, EOFError, IndexError, KeyError, ...): any
    # failure here means the file is not a checkpoint we can read.
    except Exception as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, perhaps truncated or corrupt ({error})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning/LDM .ckpt files wrap the weights
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"  {title} ({len(items)}): {shown}"


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and shape-mismatched keys; return if all fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        lines = [f"{source}: the checkpoint does not match the model config"]
        if missing:
            lines.append(_listing("missing keys", missing))
        if unexpected:
            lines.append(_listing("unexpected keys", unexpected))
        if mismatched:
            lines.append(_listing("shape mismatches", mismatched))
        raise CheckpointError("\n".join(lines))


def load_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    check_state_dict(model, state_dict, source)
    for key, value in state_dict.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: tensor {key} holds NaN or infinite values; the file is corrupt")
    model.load_state_dict(state_dict, strict=True)
