"""One micro-batch of training: the autoencoder's forward, losses, backward and optimizer step, then the
discriminator's. Accelerate's accumulate() decides which micro-batch ends an optimizer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from codec.distributions import DiagonalGaussianDistribution
from codec.layers import preferred_memory_format
from training.discriminator import discriminator_step_loss, generator_step_loss
from training.losses import KLLoss, LPIPSLoss, PixelLoss
from training.state import EMA

if TYPE_CHECKING:
    from training.setup import Trainer


@dataclass
class Losses:
    pixel: PixelLoss
    kl: KLLoss
    lpips: LPIPSLoss | None


@dataclass
class MicroBatch:
    """What the end-of-step work needs of a micro-batch: its logged values, and whether it was a blank stand-in."""

    logs: dict
    blank: bool
    skipped: int


def posterior_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int, step: int) -> torch.Tensor:
    """Standard-normal noise per image from (seed, step, image index): the same draw on any number of processes."""
    draws = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 65_537 + index) % (2**63))
        draws.append(torch.randn(shape, generator=generator))
    return torch.stack(draws)


def train_micro_batch(trainer: Trainer, batch: dict) -> MicroBatch:
    """Forward and backward of one micro-batch; the optimizers step when it completes an accumulation."""
    accelerator, run, state = trainer.accelerator, trainer.config.run, trainer.state
    pixels, indices = batch["pixels"], batch["indices"]
    # Every image of this process's batch unreadable: the step still runs, on a blank stand-in whose loss counts
    # for nothing, since a process that skipped alone would leave the others waiting in the gradient all-reduce.
    blank = pixels is None
    if blank:
        resolution = trainer.config.data.resolution
        pixels = torch.zeros(1, 3, resolution, resolution, device=accelerator.device)
        indices = torch.zeros(1, dtype=torch.int64)
    pixels = pixels.contiguous(memory_format=preferred_memory_format(pixels.device))
    if run.record_data_order:
        with open(trainer.output_dir / f"data_order.rank{accelerator.process_index}.txt", "a") as handle:
            handle.write(f"{state.step} {' '.join(map(str, batch['indices'].tolist()))}\n")
    noise = posterior_noise(indices, trainer.latent_shape, run.seed, state.step).to(pixels.device)
    # One accumulate() for both models: each call advances Accelerate's micro-batch count.
    models = [trainer.model] if trainer.discriminator is None else [trainer.model, trainer.discriminator]
    with accelerator.accumulate(*models):
        reconstruction, loss, logs = _autoencoder_loss(trainer, pixels, noise)
        accelerator.backward(loss * 0.0 if blank else loss)
        opt_config = trainer.config.optimizer
        if accelerator.sync_gradients and opt_config.max_grad_norm:
            clip_autoencoder_gradients(accelerator, trainer.optimizer, trainer.trainable, opt_config.max_grad_norm)
        trainer.optimizer.step()
        step_schedules(accelerator, trainer.optimizer, trainer.scheduler, trainer.ema, trainer.vae)
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.disc_step is not None:
            d_loss, d_logs = discriminator_step_loss(
                trainer.discriminator, pixels, reconstruction, state.step, trainer.config.loss.disc_start
            )
            if d_loss.requires_grad:
                trainer.disc_step(d_loss * 0.0 if blank else d_loss)
            logs = {**logs, **d_logs}
    return MicroBatch({**logs, "loss": loss}, blank, batch["skipped"])


def _autoencoder_loss(trainer: Trainer, pixels: torch.Tensor, noise: torch.Tensor):
    """(reconstruction, loss, logs): reconstruction, perceptual, KL and (once it starts) adversarial terms."""
    losses, loss_config, accelerator = trainer.losses, trainer.config.loss, trainer.accelerator
    trainer.model.train()
    reconstruction, moments = trainer.model(pixels, noise)
    nll, logs = losses.pixel(reconstruction, pixels)
    if losses.lpips is not None:
        perceptual, lpips_logs = losses.lpips(reconstruction, pixels)
        nll, logs = nll + perceptual, {**logs, **lpips_logs}
    kl, kl_logs = losses.kl(DiagonalGaussianDistribution(moments))
    loss, logs = nll + kl, {**logs, **kl_logs}
    if trainer.discriminator is not None:
        step, disc_start = trainer.state.step, loss_config.disc_start
        # Read only once the discriminator runs: get_scale() waits for the GPU.
        scaled = accelerator.scaler is not None and step >= disc_start
        adversarial, g_logs = generator_step_loss(
            accelerator.unwrap_model(trainer.discriminator),
            reconstruction,
            nll,
            trainer.vae.decoder.conv_out.weight,
            step,
            disc_start,
            loss_config.disc_weight,
            loss_config.adaptive_disc_weight,
            loss_scale=accelerator.scaler.get_scale() if scaled else 1.0,
        )
        loss, logs = loss + adversarial, {**logs, **g_logs}
    return reconstruction, loss, logs


def step_schedules(accelerator, optimizer, scheduler, ema: EMA | None, vae: torch.nn.Module) -> bool:
    """Advance the learning-rate schedule and the EMA after an optimizer step that changed the weights; say
    whether it did.

    Under fp16 the loss scaler skips a step whose gradients overflowed (several at the start, while it finds its
    scale). accelerate's own scheduler wrapper would skip those too, but only when it steps with the optimizer,
    which it does num_processes times per step; ours steps once, so the check is here. The EMA follows the same
    answer: averaging in weights that did not move would only shorten its memory. The run's step count still
    advances (it counts data), so a run with skipped steps ends that many steps short of the schedule's end.
    """
    if not accelerator.sync_gradients or optimizer.step_was_skipped:
        return False
    scheduler.step()
    if ema is not None:
        ema.update(vae)
    return True


def clip_autoencoder_gradients(accelerator, optimizer, parameters: list, max_norm: float) -> None:
    """Clip the autoencoder's gradients, unscaling (fp16) only its optimizer's. accelerator.clip_grad_norm_
    unscales every prepared optimizer's, and would unscale the discriminator's accumulated micro-batches twice."""
    accelerator.unscale_gradients(optimizer=optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class DiscriminatorStep:
    """The discriminator's backward and optimizer step. Under fp16 it has a loss scaler of its own: torch's amp
    allows one update() per scaler per step, and one between its micro-batches would unscale them unevenly."""

    def __init__(self, accelerator, optimizer) -> None:
        self.accelerator, self.optimizer, self.scaler = accelerator, optimizer, None
        if accelerator.scaler is not None:
            self.scaler = torch.amp.GradScaler(accelerator.device.type)
            optimizer.scaler = self.scaler  # AcceleratedOptimizer.step steps and updates through its .scaler

    def __call__(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            self.accelerator.backward(loss)
        else:  # as accelerator.backward does, with this scaler
            self.scaler.scale(loss / self.accelerator.gradient_accumulation_steps).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
