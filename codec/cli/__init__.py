"""The `codec` command. Each module adds its subcommands with `add_parsers(subparsers)` and sets the function that
runs each (`run`, or `run_cache`, `run_stats`... where one module holds two)."""

from __future__ import annotations

import argparse
import logging
import sys

from codec.checkpoint import CheckpointError
from codec.config import ConfigError
from codec.images import ImageError


def build_parser() -> argparse.ArgumentParser:
    from codec.cli import bench, cache, convert, decode, demo, encode, info, roundtrip

    parser = argparse.ArgumentParser(prog="codec", description="Stable-Diffusion-style latent image codec.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, encode, decode, roundtrip, convert, info, bench, cache):
        module.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `codec ARGS`; returns the exit status (0 on success), so tests can call it directly."""
    from codec.cli.cache import route_cache_verify
    from codec.cli.common import describe_os_error

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(route_cache_verify(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.run(args) or 0
    except (CheckpointError, ConfigError, ImageError, OSError, ValueError) as error:
        # Errors a user can act on: print them plainly, without a traceback from deep inside torch.
        message = describe_os_error(error) if isinstance(error, OSError) else str(error)
        print(f"codec {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays valid (atomic files; bench restores the last run)
        print(f"codec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
