"""The one walk of an image folder that `codec cache`, `codec bench`, training and the CLI share.

Links to folders are followed, as a user who linked a subfolder in expects (`Path.rglob` leaves them out without
a word before Python 3.13), and each real folder is walked once, so a link loop ends. Real folders are walked
before linked ones: a file reachable both ways keeps its real path. What cannot be walked (a dangling link, a
link back into a folder already walked, an unreadable folder) is returned as skipped, with the reason.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class FolderScan:
    files: list[Path] = field(default_factory=list)  # sorted
    skipped: list[Skipped] = field(default_factory=list)


def scan_folder(root: str | os.PathLike, suffixes: Collection[str]) -> FolderScan:
    """Regular files under `root` whose suffix (any case) is one of `suffixes`, following links to folders."""
    root = Path(root)
    wanted = {suffix.lower() for suffix in suffixes}
    scan = FolderScan()
    walked: dict[tuple[int, int], Path] = {}
    real, linked = [root], []  # folders still to walk; linked ones wait until every real one is done
    while real or linked:
        folder = real.pop() if real else linked.pop(0)
        if not _first_visit(folder, walked, scan):
            continue
        for entry in _entries(folder, scan):
            path = folder / entry.name
            if entry.is_symlink():
                if _is_linked_folder(path, wanted, scan):
                    linked.append(path)
            elif entry.is_dir(follow_symlinks=False):
                real.append(path)
            elif path.suffix.lower() in wanted and entry.is_file(follow_symlinks=False):
                scan.files.append(path)
    scan.files.sort()
    scan.skipped.sort(key=lambda skipped: skipped.path)
    return scan


def _first_visit(folder: Path, walked: dict[tuple[int, int], Path], scan: FolderScan) -> bool:
    """Whether `folder` is walked now: not when the same folder was walked under another path (a link loop)."""
    try:
        status = os.stat(folder)
    except OSError as error:
        scan.skipped.append(Skipped(folder, f"cannot read this folder ({error.strerror or error})"))
        return False
    identity = (status.st_dev, status.st_ino)
    if identity in walked:
        scan.skipped.append(
            Skipped(
                folder,
                f"leads to {walked[identity]}, which is walked already (a link loop, or a second link to one folder)",
            )
        )
        return False
    walked[identity] = folder
    return True


def _entries(folder: Path, scan: FolderScan) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as error:
        scan.skipped.append(Skipped(folder, f"cannot list this folder ({error.strerror or error})"))
        return []


def _is_linked_folder(path: Path, wanted: set[str], scan: FolderScan) -> bool:
    """A link: to a folder (True: walk it later), to a file (kept if wanted), or to nothing (skipped, with why)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        scan.skipped.append(Skipped(path, f"a link to {os.readlink(path)}, which does not exist"))
        return False
    except OSError as error:  # ELOOP (a chain of links back to itself), EACCES
        scan.skipped.append(Skipped(path, f"a link that cannot be followed ({error.strerror or error})"))
        return False
    if stat.S_ISREG(status.st_mode) and path.suffix.lower() in wanted:
        scan.files.append(path)
    return stat.S_ISDIR(status.st_mode)
