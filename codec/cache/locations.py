"""Where a cache's inputs and outputs live: a local path or an fsspec URL, by one code path.

`s3://`, `gs://`, `hf://`, `file://`, `memory://` (and any protocol fsspec knows) name a remote folder or file; a
plain path is local. Credentials and endpoints come from the environment as each filesystem takes them: s3fs
reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_DEFAULT_REGION and, through botocore,
AWS_ENDPOINT_URL (an S3-compatible store). Nothing here names a provider.

Writes are whole or nothing: locally a temporary file renamed into place (codec.atomic); on an object store one
PUT, which publishes the object only once it is complete (object stores have no rename).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from codec.atomic import atomic_write_bytes

# Fields that change with an object's content, best first: an ETag or content hash (hf://: git blob id), a version.
_CONTENT_FIELDS = ("ETag", "etag", "md5Hash", "blob_id", "sha256", "checksum", "generation", "version_id", "VersionId")
_TIME_FIELDS = ("mtime", "LastModified", "last_modified", "updated", "mtime_ns", "created")


def is_url(text: str | os.PathLike) -> bool:
    return "://" in str(text)


def filesystem(where: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL or a local path (`~` expanded)."""
    from fsspec.core import url_to_fs

    text = str(where) if is_url(where) else os.path.expanduser(os.fspath(where))
    try:
        return url_to_fs(text)
    except ImportError as error:  # fsspec names the package its protocol needs
        extra = " (pip install 'latent-codec[s3]')" if text.startswith(("s3://", "s3a://")) else ""
        raise ValueError(f"{text}: {error}{extra}") from None


def is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def fingerprint(info: dict) -> str:
    """What says an input changed: its content hash or version where the store gives one (an S3 ETag), else
    its size and modification time."""
    for name in _CONTENT_FIELDS:
        if info.get(name):
            return f"size={info.get('size')};{name}={info[name]}"
    for name in _TIME_FIELDS:
        if info.get(name) is not None:
            return f"size={info.get('size')};{name}={info[name]}"
    return f"size={info.get('size')}"


class Location:
    """A folder named by a path or URL: the few operations a cache makes on it, relative to its root."""

    def __init__(self, where: str | os.PathLike) -> None:
        self.given = str(where)
        self.fs, self.root = filesystem(where)
        self.root = self.root.rstrip("/") or "/"
        self.local = is_local(self.fs)

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def name(self, relative: str) -> str:
        """For messages: the location as the user gave it, then the relative part."""
        return f"{self.given.rstrip('/')}/{relative}"

    def read_bytes(self, relative: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError:
            return None

    def write_bytes(self, relative: str, data: bytes) -> None:
        if self.local:
            atomic_write_bytes(self.path(relative), data)
            return
        self.fs.pipe_file(self.path(relative), data)  # one PUT: the object appears complete or not at all
        self.fs.invalidate_cache(self.path(relative).rsplit("/", 1)[0])

    def write_if_changed(self, relative: str, data: bytes) -> bool:
        """Write unless the file already holds exactly `data` (a rerun with nothing new rewrites nothing)."""
        if self.read_bytes(relative) == data:
            return False
        self.write_bytes(relative, data)
        return True

    def open(self, relative: str, mode: str = "rb"):
        return self.fs.open(self.path(relative), mode)

    def list(self, relative: str) -> list[str]:
        """Names of the files directly in a sub-folder (none when it does not exist)."""
        self.fs.invalidate_cache(self.path(relative))
        try:
            entries = self.fs.ls(self.path(relative), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory")

    def remove(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(relative))

    def remove_temporaries(self, relative: str, prefix: str) -> None:
        """Temporary files (`.NAME.*.tmp`) that a killed local run left in a sub-folder."""
        for name in self.list(relative):
            if name.startswith(prefix) and name.endswith(".tmp"):
                self.remove(f"{relative}/{name}" if relative else name)
