"""The `codec` command. Each module adds its subcommands with `add_parsers(subparsers)` and sets the function that
runs each (`run`, or `run_decode`, `run_stats`... where one module holds two)."""

from __future__ import annotations

import argparse
import logging
import sys

from codec.checkpoint import CheckpointError
from codec.config import ConfigError
from codec.images import ImageError


def build_parser() -> argparse.ArgumentParser:
    from codec.cli import bench, cache, convert, demo, encode, info, roundtrip

    parser = argparse.ArgumentParser(prog="codec", description="Stable-Diffusion-style latent image codec.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, encode, roundtrip, convert, info, bench, cache):
        module.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `codec ARGS`; returns the exit status (0 on success), so tests can call it directly."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (CheckpointError, ConfigError, ImageError, OSError, ValueError) as error:
        # Errors a user can act on: print them plainly, without a traceback from deep inside torch.
        print(f"codec {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays valid (atomic files; bench restores the last run)
        print(f"codec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
