"""The training loop: set-up (training.setup), then micro-batches (training.step) with the work after each
optimizer step (training.end_of_step), then the export.

Multi-process runs form a real process group or refuse to start (codec.distributed), so `accelerate launch
--multi_gpu --num_processes N -m training ...` works on GPUs and, with gloo, on CPU-only machines.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path

from codec.distributed import make_accelerator, shutdown
from training.config import TrainConfig
from training.end_of_step import EndOfStep
from training.setup import Trainer, available_tracker, set_up
from training.step import train_micro_batch

log = logging.getLogger("training")


def train(config: TrainConfig, lpips_pretrained: bool = True) -> Path:
    """Run (or resume) training as configured; returns the output folder. `lpips_pretrained=False`: tests only."""
    from accelerate.utils import DataLoaderConfiguration

    run = config.run
    accelerator = make_accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=available_tracker(run.log_with),
        project_dir=str(run.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The schedule counts optimizer steps; a prepared scheduler would step once per process at each of them.
        step_scheduler_with_optimizer=False,
    )
    try:
        trainer = set_up(accelerator, config, lpips_pretrained)
        run_loop(trainer)
        if run.export and accelerator.is_main_process:
            export_final(trainer, trainer.output_dir / "final")
        return trainer.output_dir
    finally:
        shutdown(accelerator)


def run_loop(trainer: Trainer) -> None:
    """Micro-batches until the last step (or the time limit); the end-of-step work after each optimizer step."""
    if trainer.state.step >= trainer.config.run.max_steps:
        return
    end_of_step = EndOfStep(trainer)
    try:
        for batch in _batches(trainer):
            end_of_step.add(train_micro_batch(trainer, batch))
            if trainer.accelerator.sync_gradients and end_of_step.after_step():
                break
    finally:
        end_of_step.close()


def _batches(trainer: Trainer) -> Iterator[dict]:
    """Batches epoch after epoch from where the loop stands, counting them in the loop state."""
    state, loader = trainer.state, trainer.train_loader
    while True:
        trainer.train_images.set_epoch(state.epoch)
        loader.set_epoch(state.epoch)
        # skip_first_batches makes a new loader (and new workers) even for 0: only a resumed epoch needs it.
        batches = (
            trainer.accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        )
        for batch in batches:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0


def export_final(trainer: Trainer, folder: Path) -> None:
    """The final weights (the EMA when there is one) as a diffusers folder and an LDM single file."""
    vae = trainer.vae
    if trainer.ema is not None:
        vae = copy.deepcopy(vae)
        trainer.ema.copy_to(vae)
    vae.save_pretrained(folder)
    vae.save_single_file(folder / "vae.safetensors")
    log.info("exported %s and %s", folder, folder / "vae.safetensors")
