"""`python -m training --config FILE [section.key=value ...]`, or under `accelerate launch -m training ...`."""

from __future__ import annotations

import argparse
import logging
import sys

from training.config import ConfigError, load_config, shipped_config_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="training", description="Train or fine-tune an AutoencoderKL.")
    parser.add_argument(
        "--config", required=True, help=f"YAML file, or a shipped config's name: {', '.join(shipped_config_names())}"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.max_steps=100 loss.kl_weight=0")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (run.resume=true)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"training: error: {error}", file=sys.stderr)
        return 2
    from codec.checkpoint import CheckpointError
    from codec.config import ConfigError as ModelConfigError
    from codec.distributed import DistributedSetupError
    from codec.images import ImageError
    from codec.sources import SourceError
    from training.losses import LPIPSUnavailable
    from training.state import CheckpointConflict
    from training.train import train

    try:
        print(f"training: output in {train(config)}")
    except (
        CheckpointConflict, CheckpointError, ConfigError, ModelConfigError, SourceError, ImageError, LPIPSUnavailable,
        DistributedSetupError, OSError,
    ) as error:  # fmt: skip
        # What a user can act on (data, weights, a model config, LPIPS' weights, a folder it cannot write), said
        # in one line; a bug in the trainer still shows its traceback.
        print(f"training: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # checkpoints are written whole or not at all: --resume continues from the last
        print(f"training: interrupted; `--resume` continues from the last checkpoint in {config.run.output_dir}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
