"""Atomic file writes: a temporary file in the same folder, then a rename, so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name adds about 14 bytes to the real one: a name near the 255-byte limit gets a shorter prefix.
    label = path.name if len(os.fsencode(path.name)) <= 200 else path.name[:40]
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{label}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _naming(error, path) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600), and some writers (safetensors' save_file) replace the file we
        # hand them with one of their own: give what was written the permissions of an ordinary new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as error:
        named = (error.filename, error.filename2)
        if tmp_name not in {os.fsdecode(name) for name in named if isinstance(name, (str, bytes, os.PathLike))}:
            raise
        raise _naming(error, path) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _naming(error: OSError, path: Path) -> OSError:
    """The same error (errno and class) naming the file the caller writes, not its temporary stand-in."""
    return OSError(error.errno, error.strerror, str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
