"""`python -m training.export CHECKPOINT OUT`: a checkpoint of a run as a diffusers folder plus an LDM single file.

The run's `model-config.json` (two levels above the checkpoint; `config.yaml` for runs older than it) rebuilds
the architecture; the weights are the EMA's when the run kept one (as the end-of-run export does), else the
trained weights themselves. Nothing read can run code: safetensors and JSON, and for checkpoints of the older,
pickled layout, `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import warnings
from pathlib import Path

import torch

from codec import AutoencoderKL, AutoencoderKLConfig
from codec.checkpoint import CheckpointError, load_checked
from codec.config import ConfigError as ModelConfigError
from training.checkpoint import PICKLED, STATE, read_record, read_safetensors
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
    weights = checkpoint / "model.safetensors"
    layout = _layout(checkpoint)
    trained = read_safetensors(weights)  # a damaged or replaced file is named, with why
    # The checkpoint holds TrainingAutoencoder's state: the autoencoder's keys under `vae.`.
    load_checked(vae, {k.removeprefix("vae."): v for k, v in trained.items()}, str(weights))
    shadow, source = _ema_shadow(checkpoint, layout) if use_ema else (None, None)
    if shadow is not None:
        load_checked(vae, {**vae.state_dict(), **shadow}, str(source))
    if dtype is not None:
        vae.to(dtype)
    vae.requires_grad_(False)
    vae.save_pretrained(out)
    vae.save_single_file(Path(out) / "vae.safetensors")
    return vae


def _layout(checkpoint: Path) -> dict | None:
    """The checkpoint's record, its files checked whole; None for the older, pickled layout."""
    if not (checkpoint / STATE).is_file() and any((checkpoint / name).is_file() for name in PICKLED):
        return None
    return read_record(checkpoint)


def _ema_shadow(checkpoint: Path, record: dict | None) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
    """The EMA's weights, if the run kept one, and the file they come from."""
    if record is not None:
        path = checkpoint / "ema.safetensors"
        if path.name not in record["files"]:
            return None, None
        tensors = read_safetensors(path)
        return {
            name.removeprefix("shadow."): value for name, value in tensors.items() if name.startswith("shadow.")
        }, path
    # The older layout numbers its pickled objects (loop state, then the EMA if any, then a scaler if any): the
    # EMA is the one holding a shadow. Read with weights_only, which builds tensors and plain data only.
    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        try:
            with warnings.catch_warnings():  # torch's note on the pickle protocol is not the user's concern
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"{path}: holds pickled objects that safe loading refuses to build, since they could run code"
            ) from None
        except Exception as error:
            raise CheckpointError(f"{path}: not a readable PyTorch file ({type(error).__name__})") from None
        if isinstance(state, dict) and isinstance(state.get("shadow"), dict):
            return state["shadow"], path
    return None, None


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
