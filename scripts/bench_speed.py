"""Speed and memory of our AutoencoderKL against diffusers' on the same weights and inputs, in one process.

    python scripts/bench_speed.py                          # the full table (SD config) into out/bench_speed/
    python scripts/bench_speed.py --quick --out /tmp/bench # a few seconds: tiny config, small images

Both models get the same seeded random weights (SD config unless --config says otherwise) and the same inputs.
Runs are alternated (ours, theirs, theirs, ours, ...) after one warm-up each, and medians are reported, so
that a slow phase of a shared machine hits both sides alike. FLOPs come from torch.utils.flop_counter on one
run of ours; the matmul peak (a large square matmul in the same dtype) is measured in the same run. Peak
memory comes from codec bench's meter (codec.bench.measure): the resident-set high-water mark during the run
minus what the process held before, after returning freed memory to the system (CPU, Linux), or
torch.cuda.max_memory_allocated on a GPU. The report (OUT/report.md) is printed too; how close tiled and bf16
output come to the untiled fp32 output is scripts/bench_fidelity.py's question.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_report import DEFAULT_OUT, command_line, load_average, machine, markdown_table, write_report

from codec import AutoencoderKL, precision, preset
from codec.bench.measure import Meter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


# --- measurement ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(run: Callable[[], object], device: torch.device) -> int:
    """Bytes above what was in use before, at the peak of `run()` (codec bench's meter, same method)."""
    meter = Meter(device)
    with meter.memory():
        run()
    return meter.peak_bytes


@torch.no_grad()
def time_alternating(
    runs: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmups: int = 1
) -> dict[str, Timing]:
    """Time each callable `repeats` times after `warmups` warm-ups, alternating the order every round.

    The last warm-up gives the peak memory; a compiled callable needs two, or its peak would be compilation's.
    """
    timings = {name: Timing() for name in runs}
    for name, run in runs.items():  # warm-up: oneDNN/cuDNN pick and cache their kernels on first use
        for _ in range(warmups - 1):
            run()
        timings[name].peak_bytes = peak_memory(run, device)
    names = list(runs)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            timings[name].seconds.append(time.perf_counter() - start)
    return timings


@torch.no_grad()
def count_flops(run: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@torch.no_grad()
def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an n x n matmul in `dtype`: the machine's practical ceiling for dense math."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# --- the two models -------------------------------------------------------------------------------------------


def build_pair(config_name: str, seed: int, device: torch.device):
    """Our AutoencoderKL and diffusers' with identical seeded random weights, in eval mode, fp32."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(seed)
    ours = AutoencoderKL(preset(config_name)).eval()
    theirs = DiffusersAutoencoderKL(**ours.config.to_dict()).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours.to(device), theirs.to(device)


def as_dtype(model, dtype: torch.dtype):
    """A copy of `model` in `dtype` (the fp32 original stays for the fp32 rows)."""
    import copy

    return copy.deepcopy(model).to(dtype)


def encode_runs(ours, theirs, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {
        "ours": lambda: ours.encode(x).latent_dist.mode(),
        "diffusers": lambda: theirs.encode(x).latent_dist.mode(),
    }


def decode_runs(ours, theirs, z: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {"ours": lambda: ours.decode(z).sample, "diffusers": lambda: theirs.decode(z).sample}


def untiled(model):
    """Ours with tiling and slicing off whatever the memory budget says, to compare like with like."""
    model.disable_tiling()
    model.memory_budget = 1 << 62
    return model


# --- sections -------------------------------------------------------------------------------------------------


def speed_rows(ours, theirs, args, device: torch.device, peaks: dict[str, float]) -> list[list[str]]:
    """Encode and decode at each size, batch and dtype: medians, ratios, GFLOP/s, images/s, peak memory.

    Then, for each of --compile-dtypes, the same at the largest size and batch with both sides under
    torch.compile (ours through enable_compile, diffusers' decode/encode call wrapped as users do).
    """
    rows = []
    diffusers_fp32: dict[tuple[str, int, int], float] = {}  # the baseline every dtype is held against
    generator = torch.Generator().manual_seed(0)
    f = ours.config.downsample_factor
    plans = [(name, size, batch, False) for name in args.dtypes for size in args.sizes for batch in args.batches]
    plans += [(name, max(args.sizes), max(args.batches), True) for name in args.compile_dtypes]
    converted = {torch.float32: (untiled(ours), theirs)}  # one copy of each model per dtype, made when first needed
    for dtype_name, size, batch, compiled in plans:
        dtype = DTYPES[dtype_name]
        if dtype not in converted:
            converted[dtype] = (untiled(as_dtype(ours, dtype)), as_dtype(theirs, dtype))
        ours_d, theirs_d = converted[dtype]
        x = torch.rand(batch, 3, size, size, generator=generator).mul(2).sub(1).to(device, dtype)
        z = torch.randn(batch, ours.config.latent_channels, size // f, size // f, generator=generator)
        z = z.to(device, dtype)
        for op, runs in (("encode", encode_runs(ours_d, theirs_d, x)), ("decode", decode_runs(ours_d, theirs_d, z))):
            if op not in (args.compile_ops if compiled else args.ops):
                continue
            flops = count_flops(runs["ours"])  # eager: the compiled graph does the same arithmetic
            if compiled:
                ours_d.enable_compile()
                runs["diffusers"] = torch.compile(runs["diffusers"])
            timings = time_alternating(runs, args.repeats, device, warmups=2 if compiled else 1)
            ours_d.disable_compile()
            if dtype == torch.float32 and not compiled:
                diffusers_fp32[op, size, batch] = timings["diffusers"].median
            baseline = diffusers_fp32.get((op, size, batch))
            label = dtype_name + (" compiled" if compiled else "")
            row = [
                op,
                f"{size}x{size}",
                str(batch),
                label,
                *speed_cells(timings, baseline, flops, batch, peaks[dtype_name]),
            ]
            rows.append(row)
            print(" | ".join(row), flush=True)
    return rows


def speed_cells(timings: dict[str, Timing], baseline: float | None, flops: int, batch: int, peak: float) -> list[str]:
    """A speed row's measured cells: seconds, ratios, GFLOP/s (ours as a share of `peak`), images/s, peak MiB."""
    ours, theirs = timings["ours"].median, timings["diffusers"].median
    return [
        # Significant digits, not decimals: GPU rows take milliseconds, and a ratio can be 0.03.
        f"{ours:.4g}",
        f"{theirs:.4g}",
        f"{ours / theirs:.3g}",
        f"{ours / baseline:.3g}" if baseline else "-",
        f"{flops / ours / 1e9:.0f} ({100 * flops / ours / peak:.0f}%)",
        f"{flops / theirs / 1e9:.0f}",
        f"{batch / ours:.1f}",
        f"{batch / theirs:.1f}",
        f"{timings['ours'].peak_bytes / 2**20:.0f}",
        f"{timings['diffusers'].peak_bytes / 2**20:.0f}",
    ]


SPEED_HEADER = [
    "op",
    "size",
    "batch",
    "dtype",
    "ours s",
    "diffusers s",
    "ours/diffusers",
    "ours/diffusers fp32",
    "ours GFLOP/s (of matmul peak)",
    "diffusers GFLOP/s",
    "ours images/s",
    "diffusers images/s",
    "ours peak MiB",
    "diffusers peak MiB",
]


@torch.no_grad()
def tiled_rows(ours, theirs, sizes: list[int], tile: int, repeats: int, device: torch.device) -> list[list[str]]:
    """Decode at large sizes: ours untiled and tiled, diffusers untiled and tiled (same tile size).

    Runs alternate round by round and medians are reported: on a shared machine one run each can be 20% off.
    """
    rows = []
    f = ours.config.downsample_factor
    for size in sizes:
        z = torch.randn(
            1, ours.config.latent_channels, size // f, size // f, generator=torch.Generator().manual_seed(1)
        )
        z = z.to(device)
        variants: dict[str, Callable[[torch.Tensor], object]] = {}
        if size <= 1024:  # untiled 2048x2048 needs ~16 GB; its comparison is the 1024 one
            variants["ours untiled"] = lambda z: untiled(ours).decode(z).sample
            variants["diffusers untiled"] = lambda z: _diffusers_tiling(theirs, None).decode(z).sample
        variants["ours tiled"] = lambda z: _tiled(ours, tile).decode(z).sample
        variants["diffusers tiled"] = lambda z: _diffusers_tiling(theirs, tile).decode(z).sample
        results = {name: Timing() for name in variants}
        names = list(variants)
        for round_index in range(repeats):
            for name in names if round_index % 2 == 0 else reversed(names):
                meter = Meter(device)
                with meter.memory(), meter.time("decode"):
                    variants[name](z)
                results[name].seconds.append(meter.seconds["decode"])
                results[name].peak_bytes = max(results[name].peak_bytes, meter.peak_bytes)
                print(
                    f"{size} {name}: {meter.seconds['decode']:.2f} s, peak {meter.peak_bytes / 2**20:.0f} MiB",
                    flush=True,
                )
        base = results["ours untiled"].median if "ours untiled" in results else None
        for name, timing in results.items():
            ratio = f"{timing.median / base:.2f}" if base else "-"
            rows.append([f"{size}x{size}", name, f"{timing.median:.2f}", ratio, f"{timing.peak_bytes / 2**20:.0f}"])
    return rows


def _tiled(model, tile_latent: int):
    model.memory_budget = None
    model.enable_tiling(tile_latent)
    return model


def _diffusers_tiling(model, tile_latent: int | None):
    if tile_latent is None:
        model.disable_tiling()
        return model
    model.enable_tiling()
    f = 2 ** (len(model.config.block_out_channels) - 1)
    model.tile_latent_min_size = tile_latent
    model.tile_sample_min_size = tile_latent * f
    return model


TILED_HEADER = ["size", "variant", "seconds", "time / ours untiled", "peak MiB"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd", help="preset for the speed rows (default: sd)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile-dtypes",
        nargs="*",
        default=[],
        choices=sorted(DTYPES),
        help="also time both sides under torch.compile in these dtypes, at the largest size and batch",
    )
    parser.add_argument("--compile-ops", nargs="+", default=["decode"], choices=["encode", "decode"])
    parser.add_argument("--tiled-sizes", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--tiled-repeats", type=int, default=3, help="alternated runs of each large decode")
    parser.add_argument(
        "--tile", type=int, default=64, help="tile side in latent pixels, both sides (diffusers' SD default)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "bench_speed", help="folder for report.md")
    parser.add_argument("--quick", action="store_true", help="tiny config, 64-128 px, 1 repeat: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.sizes, args.batches, args.repeats = "tiny", [64], [1], 1
        args.tiled_sizes, args.tile, args.tiled_repeats = [128], 8, 1
    return args


def measure_peaks(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, float], list[str]]:
    """The matmul peak of each dtype measured, and the dtypes this CPU would emulate."""
    # A CPU without native bf16 emulates it: a 2048^2 bf16 matmul took minutes on an AVX2-only CPU.
    size = 256 if args.quick else 2048
    emulated = [name for name in args.dtypes if precision.emulated_on_cpu(DTYPES[name], device)]
    measured = {*args.dtypes, *args.compile_dtypes, *(["fp32"] if emulated else [])}
    peaks = {name: matmul_peak(DTYPES[name], device, n=size) for name in sorted(measured)}
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)
    return peaks, emulated


def report_sections(
    args: argparse.Namespace, command: str, device: torch.device, peaks: dict[str, float], emulated: list[str]
) -> list[str]:
    """The report's header: what was run, where, and how to read its ratios."""
    bf16_note = (
        f" This CPU would emulate {' and '.join(emulated)}: there ours computes with an fp32 copy of the model "
        "(codec.precision) and returns the dtype asked for, diffusers emulates; ours' share of the matmul peak "
        "is then of fp32's."
        if emulated
        else ""
    )
    return [
        f"## Speed and memory against diffusers, {args.config} config ({time.strftime('%Y-%m-%d')})",
        f"`{command}` on {machine(device)}, load average {load_average()} at start; diffusers "
        f"{_diffusers_version()}. Same seeded random weights and inputs; medians of {args.repeats} alternated "
        "runs after a warm-up. Matmul peak: "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
        + "."
        + bf16_note,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    peaks, emulated = measure_peaks(args, device)
    # Ours runs an emulated dtype in fp32, so fp32's peak is the one its GFLOP/s are a share of.
    shares_of = {name: peaks["fp32"] if name in emulated else value for name, value in peaks.items()}
    ours, theirs = build_pair(args.config, 0, device)
    speed = speed_rows(ours, theirs, args, device, shares_of)
    tiled = tiled_rows(ours, theirs, args.tiled_sizes, args.tile, args.tiled_repeats, device)

    sections = report_sections(args, command_line("bench_speed", argv), device, peaks, emulated)
    sections += [
        markdown_table(SPEED_HEADER, speed),
        "Peak memory: above what was in use before each run, by codec bench's meter (codec.bench.measure; "
        "on a CPU the resident-set peak, on a GPU max_memory_allocated).",
    ]
    if tiled:  # `--tiled-sizes` with no sizes: no such section, rather than an empty table
        sections += [
            f"Large decodes, medians of {args.tiled_repeats} alternated runs, tile {args.tile} latent px for both "
            "(peak memory: the largest above the loaded model):",
            markdown_table(TILED_HEADER, tiled),
        ]
    write_report(args.out, sections)
    return 0


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


if __name__ == "__main__":
    sys.exit(main())
