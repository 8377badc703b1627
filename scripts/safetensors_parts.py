"""Split a safetensors file into parts under a size limit, and join them back, tensor for tensor.

    python scripts/safetensors_parts.py split MODEL.safetensors OUTDIR --max-mb 15
    python scripts/safetensors_parts.py join OUTDIR/MODEL.part-*.safetensors -o MODEL.safetensors

A lent GPU machine returns files of at most 16 MiB each, and the larger embedded recipe's weights are about
19 MB in fp16. Tensors are never cut: each part holds whole tensors, in the file's key order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from codec.atomic import atomic_path


def split(path: Path, out: Path, max_bytes: int) -> list[Path]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle)
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > max_bytes:
            raise SystemExit(f"safetensors_parts: {path}: tensor {key} alone is {nbytes} bytes, over the limit")
        if size + nbytes > max_bytes and parts[-1]:
            parts.append({})
            size = 0
        parts[-1][key] = tensor
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, part in enumerate(parts):
        target = out / f"{path.stem}.part-{index}.safetensors"
        with atomic_path(target) as tmp:
            save_file(part, str(tmp), metadata=metadata)
        written.append(target)
    return written


def join(parts: list[Path], output: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    metadata = None
    for part in parts:
        with safe_open(str(part), framework="pt") as handle:
            metadata = metadata or handle.metadata()
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle)
                if key in tensors:
                    raise SystemExit(f"safetensors_parts: {part}: tensor {key} is also in an earlier part")
                tensors[key] = handle.get_tensor(key)
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    split_parser = commands.add_parser("split")
    split_parser.add_argument("file", type=Path)
    split_parser.add_argument("out", type=Path)
    split_parser.add_argument("--max-mb", type=float, default=15.0)
    join_parser = commands.add_parser("join")
    join_parser.add_argument("parts", nargs="+", type=Path)
    join_parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "split":
        for path in split(args.file, args.out, int(args.max_mb * 1e6)):
            print(path)
    else:
        join(sorted(args.parts, key=lambda p: int(p.stem.rsplit("-", 1)[-1])), args.output)
        print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
