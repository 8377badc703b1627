"""A/B one training step (forward, L1 loss, backward) of ours against diffusers on the builtin config.

    python scripts/ab_training_step.py [--reps 6]

Same weights and input, runs alternated, best time printed per variant (fp32, batch 8 of 128x128).
"""

from __future__ import annotations

import argparse
import time

import torch

import codec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(0)
    config = codec.AutoencoderKLConfig.from_json("training/configs/builtin.json")
    ours = codec.AutoencoderKL(config).train()
    theirs = DiffusersAutoencoderKL(**config.to_dict()).train()
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(8, 3, 128, 128) * 2 - 1

    def step_ours(model, pixels):
        out = model.decode_raw(model.encode_moments(pixels)[:, : config.latent_channels])
        (out - pixels).abs().mean().backward()

    def step_theirs(model, pixels):
        out = model.decode(model.encode(pixels).latent_dist.mode()).sample
        (out - pixels).abs().mean().backward()

    times: dict[str, list[float]] = {}
    for _ in range(args.reps):
        for name, step, model, channels_last in [
            ("ours", step_ours, ours, False),
            ("diffusers", step_theirs, theirs, False),
            ("ours channels_last", step_ours, ours, True),
        ]:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model.to(memory_format=fmt)
            start = time.perf_counter()
            step(model, x.contiguous(memory_format=fmt))
            times.setdefault(name, []).append(time.perf_counter() - start)
            model.to(memory_format=torch.contiguous_format)
    for name, values in times.items():
        print(f"{name}: best {min(values):.2f} s, median {sorted(values)[len(values) // 2]:.2f} s")


if __name__ == "__main__":
    main()
