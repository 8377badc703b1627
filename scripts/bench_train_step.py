"""Time one training step of an AutoencoderKL architecture, ours against diffusers', in fp32 and bf16 autocast.

    python scripts/bench_train_step.py                        # the embedded model's GPU recipe, batch 8 of 128x128
    python scripts/bench_train_step.py --batch 64 --device cuda --no-diffusers

A step as the trainer takes it, less data loading and LPIPS: encode, a posterior sample, decode, MSE plus a 1e-6
KL term, backward, and an AdamW step. Both sides hold the same seeded random weights and see the same batch.
Steps alternate between the variants after one warm-up each; the median and the best of --repeats are reported,
and every run, since a shared machine moves them. Without native bf16 on a CPU, autocast emulates it: measure fp32 only there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_report import DEFAULT_OUT, ROOT, command_line, load_average, machine, markdown_table, write_report

from codec import AutoencoderKL, AutoencoderKLConfig, preset
from codec.layers import preferred_memory_format

DEFAULT_CONFIG = ROOT / "training" / "configs" / "builtin-large.json"
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_architecture(name: str) -> AutoencoderKLConfig:
    """A preset name (sd, sdxl, flux, sd3, tiny) or a config.json file."""
    return AutoencoderKLConfig.from_json(name) if Path(name).suffix == ".json" else preset(name)


def models(config: AutoencoderKLConfig, device: torch.device, with_diffusers: bool) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ours = AutoencoderKL(config).to(device).train()
    found = {"ours": ours}
    if with_diffusers:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL

        theirs = DiffusersAutoencoderKL(**config.to_dict())
        theirs.load_state_dict({key: value.contiguous() for key, value in ours.state_dict().items()})
        found["diffusers"] = theirs.to(device).train()
    return found


def step_function(model: torch.nn.Module, pixels: torch.Tensor, autocast: torch.dtype | None) -> Callable[[], None]:
    """One optimizer step on `pixels`, under autocast to `autocast` (weights stay fp32) or in fp32."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator(pixels.device).manual_seed(0)

    def step() -> None:
        with torch.autocast(pixels.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            posterior = model.encode(pixels).latent_dist
            reconstruction = model.decode(posterior.sample(generator)).sample
            loss = torch.nn.functional.mse_loss(reconstruction.float(), pixels)
            loss = loss + 1e-6 * posterior.kl().float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each variant: one untimed warm-up each, then rounds in alternating order."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="preset name or config.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(AUTOCAST))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-diffusers", action="store_true", help="time ours only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "bench_train_step", help="folder for report.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    where = f"{machine(device)}, load average {load_average()} at start"
    config = load_architecture(args.config)
    found = models(config, device, not args.no_diffusers)
    pixels = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pixels = pixels.to(device).contiguous(memory_format=preferred_memory_format(device))  # as the trainer feeds it
    steps = {
        (precision, name): step_function(model, pixels, AUTOCAST[precision])
        for precision in args.precisions
        for name, model in found.items()
    }
    times = time_steps(steps, args.repeats, device)
    parameters = sum(p.numel() for p in found["ours"].parameters())
    rows = []
    for (precision, name), seconds in times.items():
        median = statistics.median(seconds)
        runs = ", ".join(f"{s:.3g}" for s in seconds)
        rows.append([precision, name, f"{median:.3g}", f"{min(seconds):.3g}", runs, f"{args.batch / median:.1f}"])
    sections = [
        f"## Training step, {Path(args.config).name} ({time.strftime('%Y-%m-%d')})",
        f"`{command_line('bench_train_step', argv)}` on {where}. {parameters / 1e6:.2f}M parameters, batch "
        f"{args.batch} of {args.size}x{args.size}: forward, MSE + KL, backward, AdamW; weights fp32 (bf16 and "
        f"fp16 are autocast); medians of {args.repeats} alternated steps after a warm-up.",
        markdown_table(["precision", "model", "median s", "best s", "runs (s)", "images/s (median)"], rows),
    ]
    write_report(args.out, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
