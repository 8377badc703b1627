"""Re-encode image folders as lossless WebP: the same pixels in about 70% of PNG's bytes.

    python scripts/pack_images.py data/train data/val --out .device

A lent GPU machine takes the working tree plus at most 64 MiB of carried files, and data/train's PNG crops are
about 80 MB; as lossless WebP they fit. Every image is decoded again after writing and compared pixel for pixel,
so the packed set is the training set, not an approximation of it. Other files (the manifest) are copied as they
are. Writes are atomic, and a rerun skips images already packed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from codec.atomic import atomic_path
from codec.images import IMAGE_SUFFIXES


def pack_folder(source: Path, target: Path) -> tuple[int, int]:
    """Pack one folder (not recursive); returns (bytes before, bytes after)."""
    target.mkdir(parents=True, exist_ok=True)
    before = after = 0
    for path in tqdm(sorted(source.iterdir()), desc=source.name, unit="image"):
        if not path.is_file():
            continue
        before += path.stat().st_size
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            shutil.copyfile(path, target / path.name)
            after += path.stat().st_size
            continue
        packed = target / (path.stem + ".webp")
        if not packed.exists():
            _pack_image(path, packed)
        after += packed.stat().st_size
    return before, after


def _pack_image(path: Path, packed: Path) -> None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise SystemExit(f"pack_images: {path}: cannot read the image: {error}") from error
    with atomic_path(packed) as tmp:
        image.save(tmp, format="WEBP", lossless=True, quality=100, method=4)
        with Image.open(tmp) as check:
            if not np.array_equal(np.asarray(check.convert("RGB")), np.asarray(image)):
                raise SystemExit(f"pack_images: {path}: WebP round trip changed pixels; not packed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="each folder is packed into OUT/<its name>")
    args = parser.parse_args(argv)
    names = [folder.name for folder in args.folders]
    if len(set(names)) != len(names):
        parser.error(f"folders must have distinct names, got {names}")
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder}: not a folder (run scripts/prepare_training_data.py first?)")
    total_before = total_after = 0
    for folder in args.folders:
        before, after = pack_folder(folder, args.out / folder.name)
        total_before, total_after = total_before + before, total_after + after
        print(f"{folder} -> {args.out / folder.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    print(f"total {total_before / 1e6:.1f} MB -> {total_after / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
