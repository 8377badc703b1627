"""The work after each optimizer step: the time limit, logging, validation and checkpoints.

Skipped images and the logged losses are summed across processes only at log steps: a per-step reduce (or
loss.item()) would make the CPU wait for the GPU every step instead of queueing the next one.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING

import torch

from codec.sources import SourceError
from training.checkpoint import write_checkpoint
from training.records import append_metrics, append_validation_log, draw_curves
from training.state import RunningMeans
from training.step import MicroBatch
from training.trainer_state import states_of
from training.validation import save_grid, validate

if TYPE_CHECKING:
    from training.setup import Trainer

log = logging.getLogger("training")


class EndOfStep:
    """Counts micro-batches as they come, and after each optimizer step logs, validates, checkpoints and watches
    the clock as configured. `after_step()` says when the run stops: its last step, or out of time."""

    def __init__(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self.trainer = trainer
        accelerator, run = trainer.accelerator, trainer.config.run
        self.progress = tqdm(
            total=run.max_steps, initial=trainer.state.step, disable=not accelerator.is_main_process, desc="train",
            unit="step",
        )  # fmt: skip
        self.start = time.perf_counter()
        self.means = RunningMeans()
        self.pending_skipped = self.pending_real = 0

    def add(self, micro_batch: MicroBatch) -> None:
        self.means.add(micro_batch.logs, weight=0.0 if micro_batch.blank else 1.0)  # every real micro-batch counts
        self.pending_real += not micro_batch.blank
        self.pending_skipped += micro_batch.skipped

    def after_step(self) -> bool:
        trainer, run, state = self.trainer, self.trainer.config.run, self.trainer.state
        state.step += 1
        self.progress.update(1)
        last = state.step == run.max_steps
        at_log_step = state.step % run.log_every == 0 or state.step % run.checkpoint_every == 0
        if not last and self._out_of_time(at_log_step):
            log.warning("run.time_limit_minutes reached at step %d of %d: stopping", state.step, run.max_steps)
            last = True
        if at_log_step or last:  # the skipped-image count is summed here, so before every checkpoint
            self._log()
        if state.step % run.validate_every == 0 or last:
            validate_and_record(trainer)
        if state.step % run.checkpoint_every == 0 or last:
            write_checkpoint(
                trainer.accelerator, trainer.output_dir, state.step, lambda: states_of(trainer), run.keep_checkpoints
            )
        return last

    def close(self) -> None:
        self.progress.close()

    def _log(self) -> None:
        """Log the means since the last log step (over micro-batches and processes) and the learning rate."""
        trainer, state = self.trainer, self.trainer.state
        accelerator = trainer.accelerator
        state.skipped_images += sum_over_processes(accelerator, self.pending_skipped)
        if not sum_over_processes(accelerator, self.pending_real):  # the same total, so every rank stops
            raise SourceError(
                f"{trainer.config.data.train}: every image read since the last log step was unreadable "
                f"({state.skipped_images} skipped so far; the reasons are logged above)"
            )
        self.pending_skipped = self.pending_real = 0
        means = {**self.means.read(accelerator), "lr": trainer.scheduler.get_last_lr()[0]}
        self.progress.set_postfix(loss=f"{means['loss']:.4f}", skipped=state.skipped_images)
        means["skipped_images"] = state.skipped_images
        means["steps_per_second"] = self.progress.n / max(time.perf_counter() - self.start, 1e-9)
        accelerator.log({f"train/{key}": value for key, value in means.items()}, step=state.step)
        if accelerator.is_main_process:
            append_metrics(trainer.output_dir, state.step, "train", means)

    def _out_of_time(self, at_log_step: bool) -> bool:
        """Whether any process has run past the limit.

        One process checks after every step: the clock costs nothing. Several decide together, or one would stop
        alone and hang the others; that takes a collective, which waits for the device, so only at log steps.
        """
        limit_minutes, accelerator = self.trainer.config.run.time_limit_minutes, self.trainer.accelerator
        if limit_minutes is None:
            return False
        over = time.perf_counter() - self.start > 60 * limit_minutes
        if accelerator.num_processes == 1:
            return over
        return at_log_step and sum_over_processes(accelerator, int(over)) > 0


def sum_over_processes(accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum"))


def validate_and_record(trainer: Trainer) -> None:
    """Validate the EMA (or the weights without one), and record the metrics and a grid of samples."""
    accelerator, vae, ema, state = trainer.accelerator, trainer.vae, trainer.ema, trainer.state
    losses, loader = trainer.losses, trainer.val_loader
    averaged = vae
    if ema is not None:
        averaged = copy.deepcopy(vae)
        ema.copy_to(averaged)
    metrics, samples = validate(accelerator, averaged, loader, losses.pixel, losses.lpips)
    if ema is not None:
        # The average trails the weights by about 1 / (1 - decay) steps, so in a short run still improving fast
        # the trained weights can be the better model: their PSNR beside the average's says which to export.
        trained, _ = validate(accelerator, vae, loader, losses.pixel, losses.lpips)
        if "psnr" in trained:
            metrics["trained_psnr"] = trained["psnr"]
    vae.train()
    accelerator.log({f"val/{key}": value for key, value in metrics.items()}, step=state.step)
    if accelerator.is_main_process:
        output_dir = trainer.output_dir
        log.info("step %d validation: %s", state.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        append_validation_log(output_dir, state.step, metrics)
        append_metrics(output_dir, state.step, "validation", metrics)
        draw_curves(output_dir)
        save_grid(samples, output_dir / "samples" / f"step-{state.step:07d}.png", f"step {state.step}")
