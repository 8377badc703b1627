"""Options every subcommand shares (--model, --device, --dtype) and the model they select."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="builtin",
        help="diffusers folder, single .safetensors/.ckpt file, hub id, 'builtin' (default) or 'preset:NAME' (random)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="inference precision (default fp32)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_model(args: argparse.Namespace):
    from codec.model import AutoencoderKL

    device = resolve_device(args.device)
    return AutoencoderKL.load(args.model, torch_dtype=DTYPES[args.dtype]).to(device).eval()
