"""Where a cache is read from: a local folder or an fsspec URL (`s3://`, `gs://`, `hf://`, `memory://`, `file://`).

Readers open the manifest and the shards through `CacheLocation` alone, so local and remote caches take one code
path; credentials and endpoints come from the environment as fsspec's filesystems take them, or `storage_options`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from codec.cache.locations import is_url
from codec.cache.manifest import parse_manifest, read_manifest
from codec.cache.shards import MANIFEST, CacheError


class CacheLocation:
    """A cache's root: `open("data/shard-00000.parquet")` gives a binary file wherever the cache lies."""

    def __init__(self, root: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.fs = None
        if is_url(root):
            import fsspec  # installed with datasets; only URLs need it

            self.fs, self.path = fsspec.core.url_to_fs(root, **(storage_options or {}))
            self.path = self.path.rstrip("/")
            self.name = root.rstrip("/")
        else:
            self.path = self.name = Path(root)

    def __str__(self) -> str:
        return str(self.name)

    def where(self, relative: str) -> str:
        """`relative` as a user would name it in a message."""
        return f"{self.name}/{relative}" if self.fs is not None else str(self.path / relative)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path) if self.fs is not None else self.path.is_dir()

    def open(self, relative: str) -> IO[bytes]:
        if self.fs is None:
            return open(self.path / relative, "rb")
        return self.fs.open(f"{self.path}/{relative}", "rb")

    def read_manifest(self) -> dict | None:
        """The manifest, checked as `codec.cache.manifest.read_manifest` checks a local one; None when absent."""
        if self.fs is None:
            return read_manifest(self.path)
        where = self.where(MANIFEST)
        if not self.fs.isfile(f"{self.path}/{MANIFEST}"):
            return None
        try:
            with self.open(MANIFEST) as file:
                text = file.read()
        except OSError as error:
            raise CacheError(f"{where}: unreadable manifest ({error})") from None
        return parse_manifest(text, where)
