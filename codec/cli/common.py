"""What the subcommands share: the --model, --device and --dtype options (all but convert; bench has its own), the
model they select, output names, number formatting and the sentences that replace bare errno messages."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import torch

from codec.config import PRESETS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_model_options(parser: argparse.ArgumentParser, default_model: str = "'builtin'") -> None:
    """--model, --device and --dtype. `default_model` says in --help what a left-out --model means; a command
    whose default is not builtin sets its own with parser.set_defaults."""
    parser.add_argument(
        "--model",
        default="builtin",
        help="diffusers folder, single .safetensors/.ckpt file, hub id, 'builtin' or 'preset:NAME' (random weights; "
        f"NAME: {', '.join(PRESETS)}); "
        f"default: {default_model}",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="inference precision (default fp32)")


def check_output_folder(path: Path, holds: str) -> None:
    """Before any work: an -o that names a file would otherwise fail at the first write, with a bare errno."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: is a file; -o takes the folder to write {holds} in")


# What to say, after the path, for the errors a user meets writing outputs; the rest keep the system's words.
OS_ERROR_ADVICE = {
    errno.EROFS: "the file system is read-only; write to another disk or folder",
    errno.EACCES: "permission denied; choose a folder you may write to (or read from), or change its permissions",
    errno.EPERM: "operation not permitted; choose a folder you may write to, or change its permissions",
    errno.ENOSPC: "no space left on the disk; free some space or write to another disk",
    errno.EEXIST: "already exists (perhaps a file where a folder is needed); move it or choose another path",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder, where a file is needed",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter one",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and run again",
    errno.EIO: "input/output error from the disk; check the disk, then run again",
}
if hasattr(errno, "EDQUOT"):
    OS_ERROR_ADVICE[errno.EDQUOT] = "the disk quota is used up; free some space or write to another disk"


def describe_os_error(error: OSError) -> str:
    """A sentence naming the path and what to do, instead of `[Errno 30] Read-only file system: 'x'`."""
    filename = error.filename if error.filename is not None else error.filename2
    if error.errno is None or filename is None:
        return str(error)
    path = os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)
    return f"{path}: {OS_ERROR_ADVICE.get(error.errno, error.strerror or str(error))}"


def display_name(path: Path) -> str:
    """The file name for printing and for UTF-8 reports. A name that is not UTF-8 arrives with its bytes as lone
    surrogates, which stdout and UTF-8 files refuse; each such byte shows as U+FFFD instead."""
    return os.fsencode(path.name).decode("utf-8", errors="replace")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a device name ({error})") from None
    if device.type == "meta":
        raise ValueError(f"--device {name}: meta tensors hold no data; choose cpu or a GPU")
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and getattr(backend, "is_available", lambda: False)()):
        raise ValueError(f"--device {name}: {device.type} is not available on this machine")
    return device


def output_stems(names: list[str]) -> list[str]:
    """A stem per input for the files written from it, unique where the inputs' stems are not (a.png and a.jpg
    become a_png and a_jpg; one name from two folders becomes x-1 and x-2), so no output overwrites another."""
    paths = [Path(name) for name in names]
    groups: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        groups.setdefault(path.stem, []).append(index)
    stems = [path.stem for path in paths]
    for stem, members in groups.items():
        if len(members) == 1:
            continue
        suffixes = [paths[i].suffix.lstrip(".").lower() for i in members]
        distinct = len(set(suffixes)) == len(suffixes) and all(suffixes)
        for number, index in enumerate(members, start=1):
            stems[index] = f"{stem}_{suffixes[number - 1]}" if distinct else f"{stem}-{number}"
    return stems


def ssim_or_none(original, reconstruction) -> float | None:
    """SSIM of two uint8 images, or None under its 11-pixel window (PSNR still says how close they are)."""
    from codec.metrics import SSIM_MIN_SIDE, ssim

    return ssim(original, reconstruction).item() if min(original.shape[:2]) >= SSIM_MIN_SIDE else None


def format_ssim(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def load_model(args: argparse.Namespace, foreign: bool = False):
    """--model on --device at --dtype; with `foreign`, also a folder of another diffusers autoencoder, run through
    diffusers' own class (codec.foreign)."""
    from codec.model import AutoencoderKL

    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    if foreign:
        from codec.foreign import is_foreign, load_foreign

        if is_foreign(args.model):
            return load_foreign(args.model, dtype).to(device).eval()
    return AutoencoderKL.load(args.model, torch_dtype=dtype).to(device).eval()
