"""Where the file commands may write, checked before any work: never into the model they load, never over a file
already there unless --overwrite is given, and only where a file can be made."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

SHOWN = 3  # existing files named in a refusal before "and N more"


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output files that are already there (without it, the command names them and writes nothing)",
    )


def check_outputs(targets: Iterable[Path], overwrite: bool, model: str | None = None) -> None:
    """Refuse, naming the file: a target that is or is inside `model` (a --model spec), one whose folder cannot be
    made or written, a folder where a file is to go, and (unless `overwrite`) any target that already exists."""
    targets = list(dict.fromkeys(targets))
    refuse_model_paths(targets, model)
    for target in targets:
        _check_writable(target)
    folders = [target for target in targets if target.is_dir()]
    if folders:
        raise ValueError(
            f"{folders[0]}: is a folder, where an output file is to be written; move it or write elsewhere"
        )
    existing = [target for target in targets if target.exists() or target.is_symlink()]
    if existing and not overwrite:
        raise ValueError(_existing_message(existing))


def _existing_message(existing: Sequence[Path]) -> str:
    shown = ", ".join(str(path) for path in existing[:SHOWN])
    if len(existing) > SHOWN:
        shown += f" and {len(existing) - SHOWN} more"
    verb, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
    return f"{shown} already {verb}; nothing was written: pass --overwrite to replace {them}, or write elsewhere"


def model_path(spec: str | None) -> Path | None:
    """The file or folder a --model spec loads from this machine, symlinks resolved; None for a preset or hub id."""
    if spec is None or str(spec).startswith("preset:"):
        return None
    if str(spec) == "builtin":
        from codec.builtin import BUILTIN_DIR

        return BUILTIN_DIR.resolve()
    path = Path(spec).expanduser()
    return path.resolve() if path.exists() else None


def refuse_model_paths(targets: Iterable[Path], model: str | None) -> None:
    """An output that is the model, or inside its folder, would destroy (or alter) what the command just loaded."""
    loaded = model_path(model)
    if loaded is None:
        return
    for target in targets:
        resolved = target.expanduser().resolve()
        if resolved == loaded or (target.exists() and loaded.is_file() and os.path.samefile(target, loaded)):
            raise ValueError(f"{target}: is the model this command loads ({model}); write the output elsewhere")
        if loaded.is_dir() and loaded in resolved.parents:
            raise ValueError(
                f"{target}: is inside the folder of the model this command loads ({loaded}); write the output elsewhere"
            )


def _check_writable(target: Path) -> None:
    """The nearest existing folder on the way to `target` must be a folder this user may write in."""
    ancestor = target.parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{target}: cannot be written, {ancestor} is not a folder; write elsewhere")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"{target}: cannot be written, the folder {ancestor} is read-only or not writable by this user; "
            "write elsewhere"
        )
