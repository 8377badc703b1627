"""Setting a run up: the run folder, data, model, losses and optimizers, one `prepare()`, and the resume.

Everything that can refuse the run (a folder of another run, unreadable data, a model that does not load, LPIPS
weights that cannot be fetched) does so before the run folder is written, so a refused run leaves none behind.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from codec import AutoencoderKL
from training.config import ConfigError, TrainConfig, load_config, save_config
from training.data import ImageDataset, IndexedImages, build_data, collate_indexed, images_in_full_steps
from training.discriminator import PatchGANDiscriminator
from training.export import MODEL_CONFIG
from training.losses import KLLoss, LPIPSLoss, PixelLoss
from training.model import TrainingAutoencoder, build_autoencoder
from training.records import draw_curves, forget_after, forget_steps
from training.state import EMA, LoopState, resolve_resume
from training.step import DiscriminatorStep, Losses
from training.trainer_state import resume
from training.validation import collate_validation

log = logging.getLogger("training")


@dataclass
class Trainer:
    """What set-up makes: the prepared models, optimizers and loaders, the losses, and where the loop stands."""

    accelerator: Any
    config: TrainConfig
    output_dir: Path
    model: torch.nn.Module  # the prepared TrainingAutoencoder: every forward goes through it
    vae: AutoencoderKL  # the unwrapped autoencoder inside it
    optimizer: Any
    scheduler: Any
    train_images: ImageDataset
    train_loader: DataLoader
    val_loader: DataLoader
    losses: Losses
    trainable: list[torch.nn.Parameter]
    ema: EMA | None
    discriminator: torch.nn.Module | None
    disc_optimizer: Any
    disc_step: DiscriminatorStep | None
    lr: float
    disc_lr: float
    state: LoopState

    @property
    def latent_shape(self) -> tuple[int, ...]:
        resolution = self.config.data.resolution
        return self.vae.config.latent_shape(resolution, resolution)


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    warmup, total, schedule = config.optimizer.warmup_steps, config.run.max_steps, config.optimizer.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def set_up(accelerator, config: TrainConfig, lpips_pretrained: bool) -> Trainer:
    """A trainer ready for its first (or resumed) step; the run folder is written only once nothing refused."""
    from accelerate.utils import set_seed

    run, output_dir = config.run, Path(config.run.output_dir)
    set_seed(run.seed)  # the same initial weights on every process
    _check_device(accelerator, config)
    resume_from = _checkpoint_to_resume(accelerator, config, output_dir)
    train_images, val_images = build_data(config)
    full_steps = images_in_full_steps(run, len(train_images), accelerator.num_processes)
    vae = build_autoencoder(config.model)
    losses = _losses(accelerator, config, lpips_pretrained)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        vae.config.to_json(output_dir / MODEL_CONFIG)  # what training.export rebuilds, without model.init
    trainer = _prepare(accelerator, config, vae, losses, (train_images, val_images), full_steps)
    if resume_from is not None:
        resume(trainer, resume_from)
        log.info("resumed from %s at step %d", resume_from, trainer.state.step)
    _forget_steps_to_train_again(trainer)
    if accelerator.log_with:  # the trackers it kept: none where the package is missing (warned once)
        resolution = config.data.resolution
        accelerator.init_trackers("latent-codec", config={"resolution": resolution, "lr": trainer.lr, **flat(config)})
    return trainer


def _check_device(accelerator, config: TrainConfig) -> None:
    # Every batch has the same shape, so cuDNN's one-off search for the fastest convolutions pays for itself.
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if config.run.mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.is_main_process:
        # accelerate runs fp16 on a CPU as plain fp32 (no autocast, no loss scaling), without a word.
        log.warning("run.mixed_precision fp16: on a CPU accelerate trains in fp32; bf16 is the CPU's half precision")


def _checkpoint_to_resume(accelerator, config: TrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, decided before anything touches the folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir {output_dir}: is a file, not a folder")
    resume_from = resolve_resume(config.run.resume, output_dir)
    if accelerator.is_main_process:
        if config.run.resume is True and resume_from is None:
            log.warning(
                "run.resume: no checkpoint in %s yet, so this is a new run from step 0", output_dir / "checkpoints"
            )
        if resume_from is not None:
            _log_changed_settings(output_dir / "config.yaml", config)
    return resume_from


def _losses(accelerator, config: TrainConfig, lpips_pretrained: bool) -> Losses:
    loss = config.loss
    lpips = None
    if loss.lpips_weight > 0:
        lpips = LPIPSLoss(loss.lpips_net, loss.lpips_weight, pretrained=lpips_pretrained).to(accelerator.device)
    resolution = config.data.resolution
    # kl_weight is in LDM's convention, a reconstruction loss summed over an image's 3*R*R values; ours are means.
    return Losses(PixelLoss(loss.pixel, loss.pixel_weight), KLLoss(loss.kl_weight / (3 * resolution**2)), lpips)


def _prepare(accelerator, config: TrainConfig, vae, losses: Losses, images: tuple, full_steps: int) -> Trainer:
    """Optimizers, schedule, EMA, loaders and the discriminator, through one accelerator.prepare()."""
    opt = config.optimizer
    model = TrainingAutoencoder(vae)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr, disc_lr = config.learning_rates(accelerator.num_processes)
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=opt.betas, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    ema = EMA(model.vae, opt.ema_decay) if opt.ema_decay else None
    train_loader, val_loader = _loaders(config, *images, full_steps)
    prepared = [model, optimizer, train_loader, val_loader, scheduler]
    if config.loss.disc_start is not None:
        discriminator = PatchGANDiscriminator(layers=config.loss.disc_layers)
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        # The configured decay (LDM: none, plain Adam); AdamW's own default would add 0.01.
        prepared += [discriminator, torch.optim.AdamW(discriminator.parameters(), lr=disc_lr, betas=opt.betas,
                                                      weight_decay=opt.weight_decay)]  # fmt: skip
    prepared = accelerator.prepare(*prepared)
    model, optimizer, train_loader, val_loader, scheduler = prepared[:5]
    discriminator, disc_optimizer = prepared[5:] if len(prepared) > 5 else (None, None)
    disc_step = DiscriminatorStep(accelerator, disc_optimizer) if discriminator is not None else None
    return Trainer(
        accelerator, config, Path(config.run.output_dir), model, accelerator.unwrap_model(model).vae, optimizer,
        scheduler, images[0], train_loader, val_loader, losses, trainable, ema, discriminator, disc_optimizer,
        disc_step, lr, disc_lr, LoopState(),
    )  # fmt: skip


def _loaders(config: TrainConfig, train_images, val_images, full_steps: int) -> tuple[DataLoader, DataLoader]:
    run, workers = config.run, config.data.num_workers
    generator = torch.Generator().manual_seed(run.seed)
    indexed = IndexedImages(train_images)
    train_loader = DataLoader(
        indexed,
        batch_size=run.batch_size,
        # Each epoch a shuffled subset of whole steps' worth: every optimizer step sees its full global batch.
        sampler=RandomSampler(indexed, num_samples=full_steps, generator=generator),
        drop_last=True,
        num_workers=workers,
        collate_fn=collate_indexed,
        generator=generator,
        # Workers that outlive the epoch, which restarting would stall the GPU for (ImageDataset.set_epoch reaches them).
        persistent_workers=workers > 0,
    )
    collate = functools.partial(collate_validation, resolution=config.data.resolution)
    return train_loader, DataLoader(val_images, batch_size=run.batch_size, collate_fn=collate)


def _forget_steps_to_train_again(trainer: Trainer) -> None:
    """A run killed after its checkpoint recorded steps it now trains again; a fresh run in a folder whose run died
    before its first checkpoint starts the records afresh. (data_order counts from 0.)"""
    accelerator, step, output_dir = trainer.accelerator, trainer.state.step, trainer.output_dir
    if trainer.config.run.record_data_order:
        forget_steps(output_dir / f"data_order.rank{accelerator.process_index}.txt", lambda s: s < step)
    if accelerator.is_main_process:
        forget_after(output_dir, step)
        draw_curves(output_dir)  # without the dropped steps until the next validation redraws it


def available_tracker(name: str | None) -> str | None:
    """The tracker, if its package is installed; accelerate alone only says "no supported trackers"."""
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(str(name))
    if name and package and importlib.util.find_spec(package) is None:
        log.warning(
            "run.log_with=%s, but %s is not installed (pip install %s): metrics go to the console, "
            "metrics.jsonl, curves.png and validation.log only", name, package, package,
        )  # fmt: skip
        return None
    return name


def _log_changed_settings(saved: Path, config: TrainConfig) -> None:
    """Say which settings a resumed run changes, before config.yaml is rewritten with them."""
    try:
        before = flat(load_config(saved))
    except Exception:  # a missing or unreadable record only loses the message
        return
    changed = [
        f"{key} {before.get(key)} -> {value}"
        for key, value in flat(config).items()
        if key != "run.resume" and before.get(key) != value
    ]
    if changed:
        log.warning("resuming with changed settings (they apply from here on): %s", "; ".join(changed))


def flat(config: TrainConfig) -> dict:
    """The config as `section.key: value`, values other than numbers, strings and bools as strings."""
    return {
        f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
        for section, values in asdict(config).items()
        for key, value in values.items()
    }
