"""What a sharded source string names: the input shards behind a brace pattern, a glob, a folder or one file.

    'data/{00000..00999}.tar'       WebDataset's brace convention: a zero-padded range (or {a,b,c} alternatives)
    'data/part-*.parquet'           a glob (*, ?, [...])
    'data/' or 's3://bucket/data'   a folder: every shard file under it (recursive)

Paths may be fsspec URLs. Each input is named relative to the pattern's fixed root (the folder before the first
brace or wildcard), so that moving the whole dataset keeps every name, and each carries its fingerprint from the
listing itself: listing is one request per folder, not one per file, whatever the number of shards.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from codec.cache.locations import filesystem, fingerprint, is_url
from codec.images import IMAGE_SUFFIXES
from codec.sources import SourceError

SHARD_SUFFIXES = {".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".parquet": "parquet"}
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_EXPANDED = 10_000_000  # a typo like {0..99999999999} must fail, not fill memory


@dataclass(frozen=True)
class Input:
    """One input shard: its name relative to the source's root, where it is, its size and fingerprint."""

    name: str
    path: str  # within the filesystem (no protocol)
    size: int
    fingerprint: str


def _alternatives(body: str) -> list[str]:
    match = _RANGE.fullmatch(body)
    if match:
        first, last = match.groups()
        start, stop = int(first), int(last)
        if abs(stop - start) >= _MAX_EXPANDED:
            raise SourceError(f"{{{body}}}: a range of more than {_MAX_EXPANDED} names")
        width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
        step = 1 if stop >= start else -1
        return [f"{n:0{width}d}" for n in range(start, stop + step, step)]
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]  # not a pattern: braces taken as written


def expand_braces(pattern: str) -> list[str]:
    """`{a..b}` ranges (zero-padded as `a` is written) and `{x,y}` alternatives, every combination, in order."""
    parts, choices, position = [], [], 0
    for match in _BRACE.finditer(pattern):
        parts.append(pattern[position : match.start()])
        choices.append(_alternatives(match.group(1)))
        position = match.end()
    parts.append(pattern[position:])
    if not choices:
        return [pattern]
    total = 1
    for options in choices:
        total *= len(options)
    if total > _MAX_EXPANDED:
        raise SourceError(f"{pattern}: names {total} files, more than {_MAX_EXPANDED}")
    expanded = []
    for combination in itertools.product(*choices):
        expanded.append("".join(itertools.chain.from_iterable(zip(parts, [*combination, ""], strict=True))))
    return expanded


def is_pattern(text: str) -> bool:
    return bool(_GLOB_CHARS.search(text)) or any(_alternatives(m.group(1))[0][:1] != "{" for m in _BRACE.finditer(text))


def shard_kind(name: str) -> str | None:
    """'tar' or 'parquet' for a shard's file name, None for anything else."""
    lower = name.lower()
    return next((kind for suffix, kind in SHARD_SUFFIXES.items() if lower.endswith(suffix)), None)


def _fixed_root(path: str) -> str:
    """The folder before the first brace or wildcard."""
    cut = min([m.start() for m in (_GLOB_CHARS.search(path), _BRACE.search(path)) if m] or [len(path)])
    return path[:cut].rsplit("/", 1)[0] if "/" in path[:cut] else ""


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if root and path.startswith(root) else path.lstrip("/")


def _listed(fs, folder: str) -> dict[str, dict]:
    try:
        return {entry["name"].rstrip("/"): entry for entry in fs.ls(folder, detail=True)}
    except FileNotFoundError:
        return {}


def _expanded_infos(fs, names: list[str], source: str) -> dict[str, dict]:
    """Each expanded name's listing entry: one listing per folder they sit in. Missing names are refused."""
    by_folder: dict[str, list[str]] = {}
    for name in names:
        by_folder.setdefault(name.rsplit("/", 1)[0] if "/" in name else "", []).append(name)
    infos, missing = {}, []
    for folder, members in by_folder.items():
        listing = _listed(fs, folder) if folder or not is_url(source) else {}
        for name in members:
            entry = listing.get(name.rstrip("/"))
            if entry is None or entry.get("type") == "directory":
                missing.append(name)
            else:
                infos[name] = entry
    if missing:
        raise SourceError(
            f"{source}: {len(missing)} of {len(names)} shards it names do not exist (first: {missing[0]})"
        )
    return infos


def list_inputs(source: str) -> tuple[str, str, list[Input]]:
    """(kind, root path, inputs sorted by name) for a brace pattern, a glob, a folder or one shard file."""
    fs, path = filesystem(source)
    path = path.rstrip("/") if len(path) > 1 else path
    if _BRACE.search(path) and is_pattern(path):
        names = expand_braces(path)
        if any(_GLOB_CHARS.search(name) for name in names):
            infos = {k: v for name in names for k, v in fs.glob(name, detail=True).items()}
        else:
            infos = _expanded_infos(fs, names, source)
        root = _fixed_root(path)
    elif _GLOB_CHARS.search(path):
        infos, root = fs.glob(path, detail=True), _fixed_root(path)
    elif fs.isdir(path):
        infos, root = fs.find(path, detail=True), path
    elif fs.isfile(path):
        infos, root = {path: fs.info(path)}, path.rsplit("/", 1)[0] if "/" in path else ""
    else:
        raise SourceError(f"{source}: no such file or folder")
    return _typed(source, root, infos)


def _typed(source: str, root: str, infos: dict[str, dict]) -> tuple[str, str, list[Input]]:
    files = {name: info for name, info in infos.items() if info.get("type", "file") != "directory"}
    kinds = {name: shard_kind(name) for name in files}
    found = {kind for kind in kinds.values() if kind}
    if not found:
        raise SourceError(f"{source}: no shard files ({', '.join(SHARD_SUFFIXES)}) found")
    if len(found) > 1:
        raise SourceError(f"{source}: holds both .tar and .parquet shards; name one kind (a glob such as '*.tar')")
    inputs = [
        Input(_relative(name, root), name, int(info.get("size") or 0), fingerprint(info))
        for name, info in files.items()
        if kinds[name]
    ]
    return found.pop(), root, sorted(inputs, key=lambda item: item.name)


def is_shard_source(text: str) -> bool:
    """Whether `codec cache` reads SRC as input shards: a URL, a brace pattern or glob, a .tar file, or a local
    folder in which the first file met is a tar (not an image). A local .parquet file or folder stays a dataset,
    whose files name its splits; a glob of them ('data/*.parquet') reads them as shards."""
    if is_url(text) or shard_kind(text) == "tar":
        return True
    path = Path(text).expanduser()
    if path.exists():
        return path.is_dir() and _first_kind(path) == "tar"
    return is_pattern(text)


def _first_kind(folder: Path) -> str | None:
    for path in folder.rglob("*"):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return "image"
        if shard_kind(path.name) == "tar":
            return "tar"
    return None
