"""Train for a wall-clock budget: measure this machine's step time, then run the recipe for as many steps as fit.

    python scripts/train_for.py --minutes 6 --config builtin-large [section.key=value ...]

A GPU machine booked for a fixed time runs at a speed not known in advance. Stopping a cosine schedule early
wastes most of its annealing, so rather than cut a run short this first times two short runs of the same recipe
(their difference is the time per step, what is left is the fixed start-up: data workers, the first steps'
kernel selection), then sets `run.max_steps` so that the real run, with its validations and checkpoints, ends
inside the budget. The chosen step count is in the run's config.yaml, so the run reproduces without this script.
A first, untimed run of SHORT steps pays the once-per-process costs (CUDA's start, cuDNN's algorithm search), which
would otherwise land in the short run alone and make the step look cheaper than it is. As a safety net the run
also gets run.time_limit_minutes: should the estimate still be off, it stops in time, validated and exported.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from training.config import ConfigError, TrainConfig, apply_overrides, load_config

log = logging.getLogger("train_for")


@dataclass(frozen=True)
class StepTime:
    per_step: float  # seconds per optimizer step
    fixed: float  # seconds of start-up and end, whatever the step count


def time_steps(config: TrainConfig, short: int, long: int) -> StepTime:
    """Time the recipe at two step counts, without checkpoints, validation, tracker or export."""
    from training.train import train

    durations = []
    with tempfile.TemporaryDirectory(prefix="train_for-") as scratch:
        for steps in (short, short, long):  # the first is the untimed warm-up
            trial = apply_overrides(
                config,
                [
                    f"run.max_steps={steps}",
                    f"run.output_dir={Path(scratch) / str(steps)}",
                    f"run.checkpoint_every={steps + 1}",
                    f"run.validate_every={steps + 1}",
                    f"optimizer.warmup_steps={min(config.optimizer.warmup_steps, steps)}",
                    "run.resume=false",
                    "run.export=false",
                    "run.log_with=null",
                ],
            )
            start = time.perf_counter()
            _fresh_accelerate()
            train(trial)
            durations.append(time.perf_counter() - start)
            shutil.rmtree(Path(scratch) / str(steps), ignore_errors=True)
    # A noisy machine can make the longer run look no slower; never let the estimate reach zero.
    durations = durations[1:]
    per_step = max((durations[1] - durations[0]) / (long - short), durations[1] / long / 10)
    return StepTime(per_step=per_step, fixed=max(0.0, durations[1] - long * per_step))


def _fresh_accelerate() -> None:
    """Forget the last run's Accelerate state, so each run of this process starts as a new process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def steps_within(budget_s: float, timing: StepTime, config: TrainConfig, margin: float) -> int:
    """Steps that fit the budget, leaving `margin` of it for validations, checkpoints and the export."""
    usable = budget_s * (1 - margin) - timing.fixed
    # Validation reads validation_images crops forward-only (about a third of a training step's work per image)
    # every validate_every steps; count it, so that a short budget with frequent validation still ends in time.
    val_fraction = config.data.validation_images / (3 * config.run.batch_size) / config.run.validate_every
    return max(1, math.floor(usable / (timing.per_step * (1 + val_fraction))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget for the whole script")
    parser.add_argument("--config", required=True, help="YAML file or shipped name, as for `python -m training`")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for `python -m training`")
    parser.add_argument(
        "--trial-steps",
        type=int,
        nargs=2,
        default=(5, 25),
        metavar=("SHORT", "LONG"),
        help="two timing runs of this many steps; their difference gives the time per step (default 5 25)",
    )
    parser.add_argument("--margin", type=float, default=0.1, help="fraction of the budget kept in hand")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    short, long = args.trial_steps
    if not 0 < short < long:
        parser.error(f"--trial-steps: need 0 < SHORT < LONG, got {short} {long}")
    if args.minutes <= 0 or not 0 <= args.margin < 1:
        parser.error("--minutes must be > 0 and --margin in [0, 1)")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"train_for: error: {error}", file=sys.stderr)
        return 2
    if config.run.resume:
        parser.error("run.resume: a budgeted run starts fresh (its schedule is sized to the budget)")

    started = time.perf_counter()
    timing = time_steps(config, short, long)
    remaining = args.minutes * 60 - (time.perf_counter() - started)
    steps = steps_within(remaining, timing, config, args.margin)
    warmup = min(config.optimizer.warmup_steps, steps // 10)
    print(
        f"train_for: {timing.per_step:.3f} s/step, {timing.fixed:.1f} s start-up; {remaining:.0f} s left "
        f"-> {steps} steps (warm-up {warmup})",
        flush=True,
    )
    # The loop starts after the fixed start-up; past half the margin it stops, leaving the rest for the end.
    limit_minutes = max(remaining * (1 - args.margin / 2) - timing.fixed, 1.0) / 60
    overrides = [
        f"run.max_steps={steps}",
        f"optimizer.warmup_steps={warmup}",
        f"run.time_limit_minutes={limit_minutes:.3f}",
    ]
    config = apply_overrides(config, overrides)
    from training.train import train

    _fresh_accelerate()
    print(f"train_for: output in {train(config)} after {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
