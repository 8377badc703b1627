"""Where a decode's time goes: torch.profiler over one decode after a warm-up, the top operators by self time, and
how many operators ran (at small sizes a GPU is launch-bound, so the count matters as much as the FLOPs).

    python scripts/profile_decode.py --size 1024 --tiled --device cuda     # the SD config, as bench_speed
    python scripts/profile_decode.py --config tiny --size 256 --tiled      # seconds on a CPU

Seeded random weights; the latent is random too (decode time does not depend on its values).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from codec import AutoencoderKL, preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def profile_decode(
    config: str, size: int, tile: int | None, dtype: torch.dtype, device: torch.device, rows: int
) -> tuple[int, str]:
    """(operators run in one decode, the profiler's table of the top `rows` by self time)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(preset(config)).eval().to(device, dtype)
    if tile:
        vae.memory_budget = None
        vae.enable_tiling(tile)
    else:
        vae.disable_tiling()
        vae.memory_budget = 1 << 62
    f = vae.config.downsample_factor
    z = torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=torch.Generator().manual_seed(1))
    z = z.to(device, dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        vae.decode(z)  # warm-up: kernel selection, allocator
        with profile(activities=activities) as prof:
            vae.decode(z)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    # Operators called from Python, not those they call in turn: what a launch-bound GPU pays for one by one.
    count = sum(1 for event in prof.events() if event.name.startswith("aten::") and event.cpu_parent is None)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return count, prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd", help="preset (default: sd)")
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels")
    parser.add_argument("--tiled", action="store_true", help="force tiled decode")
    parser.add_argument("--tile", type=int, default=64, help="tile side in latent pixels (with --tiled)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=20, help="operators listed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tile = args.tile if args.tiled else None
    count, table = profile_decode(args.config, args.size, tile, DTYPES[args.dtype], device, args.rows)
    mode = f"tiled (tile {args.tile})" if tile else "untiled"
    print(f"{args.config} decode {args.size}x{args.size} {mode}, {args.dtype} on {device}: {count} top-level operators")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
