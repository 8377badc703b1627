"""Reading tensors from checkpoint files and loading them into a model only after every key and shape checks."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from codec.config import AutoencoderKLConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and why."""


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from, as its loader found them."""

    source: str | None = None  # the file, folder, hub file or preset read; None for a model built in code
    scaling_is_guess: bool = False  # the scaling factor was guessed from the shapes (a bare single file)
    about: str | None = None  # the embedded model's description (its ABOUT.md)


@dataclass(frozen=True)
class LoadedWeights:
    """What a loader read, for AutoencoderKL to build and check: the config, the state dict in diffusers' layout
    (None: no weights, the model keeps its seeded random initialisation) and where they came from."""

    config: AutoencoderKLConfig
    state_dict: dict[str, torch.Tensor] | None
    provenance: Provenance


class Checkpoint(NamedTuple):
    tensors: dict[str, torch.Tensor]  # those that `keep` chose, or all
    metadata: dict[str, str]  # a safetensors header's, or a pickled checkpoint's top-level strings
    names: list[str]  # every tensor's name in the file, read or not


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, or of a pickled `.ckpt`/`.bin`/`.pt` read with `weights_only=True`."""
    return read_checkpoint(path).tensors


def read_checkpoint(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Checkpoint:
    """The tensors whose names `keep` accepts (all without it), with the file's metadata and every name in it.

    Only the kept tensors are read: the VAE of a whole SDXL checkpoint is 0.17 GB of its 6.9 GB. Safetensors are
    read tensor by tensor; pickles in torch's zip format are memory-mapped, so the rest is never paged in."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder; this reads one .safetensors/.ckpt file (a diffusers folder loads with from_pretrained)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    keep = keep or (lambda name: True)
    if is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                names = list(file.keys())
                tensors = {name: file.get_tensor(name) for name in names if keep(name)}
                return Checkpoint(tensors, dict(file.metadata() or {}), names)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors file, perhaps truncated or corrupt ({error})"
            ) from None
    # torch's zip format (every torch.save since 1.6) can be memory-mapped; the legacy format cannot.
    mapped = zipfile.is_zipfile(path)
    try:
        data = _load_pickle(path, mmap=mapped)
    except CheckpointError:
        if not mapped:
            raise
        mapped = False  # a file system that cannot memory-map (some network and FUSE mounts): read it whole
        data = _load_pickle(path, mmap=False)
    metadata = {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning/LDM .ckpt files wrap the weights
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    names = [name for name, value in data.items() if isinstance(value, torch.Tensor)]
    # Kept tensors are copied out of the memory map, so that nothing returned holds the file open.
    tensors = {name: data[name].clone() if mapped else data[name] for name in names if keep(name)}
    return Checkpoint(tensors, metadata, names)


def is_safetensors(path: Path) -> bool:
    """By content, not name: FLUX's autoencoder shipped as `ae.sft`, and suffixes get upper-cased or dropped. A
    safetensors file opens with its JSON header's length (8 bytes, little-endian) and then the header's `{`."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        return path.suffix.lower() == ".safetensors"
    if len(head) == 9 and head[8:9] == b"{":  # no pickle or zip starts so; a header cut short is still safetensors'
        return int.from_bytes(head[:8], "little") >= 2
    return path.suffix.lower() == ".safetensors"  # a damaged one: let the safetensors reader say what is wrong


# What old checkpoints pickle beside their tensors that safe loading refuses by default, yet is only data: the
# classes PyTorch Lightning keys its `callbacks` entry by (LDM's and SD 1.x's .ckpt files), and numpy scalars and
# arrays (`global_step`, metrics). Lightning's classes are stood in for by empty classes of the same name: nothing
# of Lightning is imported or run.
_NUMPY_DATA = {
    "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
}  # fmt: skip
_STAND_IN_PREFIXES = ("pytorch_lightning.", "lightning.")


def _load_pickle(path: Path, mmap: bool):
    # weights_only refuses arbitrary pickled code: a checkpoint from the internet must not run programs.
    allowed: dict[str, object] = {}
    zipped = zipfile.is_zipfile(path)
    for _ in range(64):  # one round per refused global in the legacy format, which names them one at a time
        try:
            with torch.serialization.safe_globals(list(allowed.values())):
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as error:
            refused = [name for name in _refused_globals(path, zipped, error) if name not in allowed]
            if not refused:
                # Garbage bytes reach the unpickler in many ways (UnpicklingError, EOFError, IndexError, ...): any
                # failure that is not a refused global means the file is not a checkpoint we can read.
                raise CheckpointError(
                    f"{path}: not a readable PyTorch checkpoint, perhaps truncated or corrupt ({_first_line(error)})"
                ) from None
        unsafe = [name for name in refused if _harmless(name) is None]
        if unsafe and not zipped and not any(_importable(name) for name in unsafe):
            # The legacy format names what it refuses from the bytes it read: a file cut short names a fragment
            # ("torch.FloatStor"). A name that resolves to nothing is more likely damage than a payload.
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint, perhaps truncated or corrupt (it names "
                f"{', '.join(unsafe)}, which is not importable here)"
            )
        if unsafe:
            raise CheckpointError(
                f"{path}: holds pickled objects that safe loading refuses to build, since they could run code: "
                f"{', '.join(unsafe)}. Convert it to .safetensors where you trust it, or load the weights elsewhere."
            )
        for name in refused:
            allowed[name] = _harmless(name)
            if name == "numpy.dtype":  # a dtype unpickles as an instance of its class in numpy.dtypes
                import numpy

                allowed.update(
                    {f"numpy.dtypes.{n}": getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")}
                )
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (too many pickled classes)")


def _refused_globals(path: Path, zipped: bool, error: Exception) -> list[str]:
    """The globals safe loading refused: all of them for torch's zip format; for the legacy format, which cannot be
    inspected without unpickling, the one its error names."""
    if zipped:
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:
            return []
    if isinstance(error, pickle.UnpicklingError):
        # A dotted name: a truncated file can make the unpickler read a fragment ("GLOBAL col.") as one.
        return re.findall(r"GLOBAL ((?:\w+\.)+\w+)\b", str(error))[:1]
    return []


def _first_line(error: Exception) -> str:
    """What went wrong, without torch's colour codes or its advice to retry with weights_only=False."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    text = text.split("WeightsUnpickler error:", 1)[-1].strip()
    return text.splitlines()[0].split(" Please use")[0] if text else type(error).__name__


def _importable(name: str) -> bool:
    """Whether `module.qualname` may name something real. Only modules already loaded are looked into: importing
    one to find out would run the import-time code of whatever package an untrusted file names. A module not
    loaded counts as real, so its name is refused as code, the cautious reading."""
    import sys

    module, _, qualname = name.rpartition(".")
    found = sys.modules.get(module)
    return found is None or hasattr(found, qualname.split(".")[0])


def _harmless(name: str):
    """The object to unpickle `name` as, if it is only data (see _NUMPY_DATA); None otherwise."""
    module, _, qualname = name.rpartition(".")
    if name in _NUMPY_DATA:
        import importlib

        try:
            return getattr(importlib.import_module(module), qualname)
        except (ImportError, AttributeError):
            return None
    if name.startswith(_STAND_IN_PREFIXES):
        return type(qualname, (), {"__module__": module, "__qualname__": qualname})
    return None


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
