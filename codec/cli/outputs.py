"""Where the file commands may write, checked before any work: never into the model they load, never over a file
already there unless --overwrite is given or an earlier run wrote it (and nobody changed it since), and only where
a file can be made.

What a command wrote is listed, with each file's SHA-256, in `.codec-outputs.json` beside it: so a rerun into its
own output folder replaces its own earlier files, while a user's file of the same name is never touched."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from codec.atomic import atomic_write_text

SHOWN = 3  # existing files named in a refusal before "and N more"
LEDGER = ".codec-outputs.json"


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
    existing = [target for target in targets if target.is_symlink() or (target.exists() and not written_by_us(target))]
    if existing and not overwrite:
        raise ValueError(_existing_message(existing))


def _existing_message(existing: Sequence[Path]) -> str:
    shown = ", ".join(str(path) for path in existing[:SHOWN])
    if len(existing) > SHOWN:
        shown += f" and {len(existing) - SHOWN} more"
    verb, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
    return (
        f"{shown} already {verb} and {'was' if len(existing) == 1 else 'were'} not written by codec; nothing was "
        f"written: pass --overwrite to replace {them}, or write elsewhere"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ledger(folder: Path) -> dict[str, str]:
    """The folder's record of what codec wrote there; unreadable or malformed counts as empty (refuse, not guess)."""
    try:
        entries = json.loads((folder / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {name: digest for name, digest in entries.items() if isinstance(digest, str)}


def written_by_us(path: Path) -> bool:
    """An earlier codec command wrote this file, and its bytes are still the ones it wrote."""
    recorded = _ledger(path.parent).get(path.name)
    return recorded is not None and path.is_file() and _sha256(path) == recorded


@contextlib.contextmanager
def recording(targets: Iterable[Path]) -> Iterator[None]:
    """Around a command's writing: list in each folder's ledger the targets this run wrote, even if it fails later,
    so that a rerun may replace them."""
    targets = list(dict.fromkeys(targets))
    start_ns = time.time_ns() - 2_000_000_000  # file systems with coarse timestamps round mtimes down
    try:
        yield
    finally:
        written = [t for t in targets if t.is_file() and not t.is_symlink() and t.stat().st_mtime_ns >= start_ns]
        for folder in dict.fromkeys(target.parent for target in written):
            entries = _ledger(folder)
            entries.update({t.name: _sha256(t) for t in written if t.parent == folder})
            with contextlib.suppress(OSError):  # the outputs are written; losing the ledger only costs --overwrite
                atomic_write_text(folder / LEDGER, json.dumps(entries, indent=1, sort_keys=True) + "\n")


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
