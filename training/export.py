"""`python -m training.export CHECKPOINT OUT`: a checkpoint of a run as a diffusers folder plus an LDM single file.

The run's `model-config.json` (two levels above the checkpoint; `config.yaml` for runs older than it) rebuilds
the architecture; the weights are the
EMA's when the run kept one (as the end-of-run export does), else the trained weights themselves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from codec import AutoencoderKL, AutoencoderKLConfig
from codec.checkpoint import CheckpointError, load_checked, read_tensors
from codec.config import ConfigError as ModelConfigError
from training.config import ConfigError, load_config
from training.model import build_autoencoder

# The architecture (and scaling factors) of the run's model, written by train.py when the run starts.
MODEL_CONFIG = "model-config.json"


def export_checkpoint(
    checkpoint: Path, out: Path, use_ema: bool = True, dtype: torch.dtype | None = None
) -> AutoencoderKL:
    checkpoint = Path(checkpoint)
    if not (checkpoint / "model.safetensors").is_file():
        raise CheckpointError(
            f"{checkpoint}: not a checkpoint (a run's checkpoints/step-N folder, with model.safetensors)"
        )
    run_dir = checkpoint.parent.parent
    architecture = run_dir / MODEL_CONFIG
    if not architecture.is_file() and not (run_dir / "config.yaml").is_file():
        raise CheckpointError(
            f"{checkpoint}: its run folder {run_dir} has neither {MODEL_CONFIG} nor config.yaml, which say the "
            "architecture; export a checkpoint inside its run folder"
        )
    if architecture.is_file():
        # The checkpoint holds every weight: the run's model.init (a folder that may have moved, a hub id offline)
        # is not read again.
        vae = AutoencoderKL(AutoencoderKLConfig.from_json(architecture)).eval()
    else:  # a run from before MODEL_CONFIG was written
        vae = build_autoencoder(load_config(run_dir / "config.yaml").model).eval()
    trained = read_tensors(checkpoint / "model.safetensors")  # a damaged file is named, with why
    # The checkpoint holds TrainingAutoencoder's state: the autoencoder's keys under `vae.`.
    load_checked(vae, {k.removeprefix("vae."): v for k, v in trained.items()}, str(checkpoint / "model.safetensors"))
    shadow = _ema_shadow(checkpoint) if use_ema else None
    if shadow is not None:
        with torch.no_grad():
            for name, param in vae.named_parameters():
                if name in shadow:
                    param.copy_(shadow[name])
    if dtype is not None:
        vae.to(dtype)
    vae.requires_grad_(False)
    vae.save_pretrained(out)
    vae.save_single_file(Path(out) / "vae.safetensors")
    return vae


def _ema_shadow(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """The EMA's weights, if the run kept one. accelerate numbers the registered objects in their order (loop
    state, then the EMA if any, then a discriminator's GradScaler if any), so the EMA is found by what it holds."""
    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "shadow" in state:
            return state["shadow"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="training.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run's checkpoints/step-N folder")
    parser.add_argument("output", type=Path, help="folder to write")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    parser.add_argument("--fp16", action="store_true", help="store the weights in half precision")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.output, not args.no_ema, torch.float16 if args.fp16 else None)
    except (CheckpointError, ConfigError, ModelConfigError, OSError) as error:
        print(f"training.export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} and {args.output / 'vae.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
