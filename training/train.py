"""The training loop: one `prepare()`, every forward through the prepared model, Accelerate for the rest.

Read top to bottom: set-up (model, losses, data, optimizers), resume, the loop (generator step, then
discriminator step), and the end (export). Multi-process runs form a real process group or refuse to start
(codec.distributed), so `accelerate launch --multi_gpu --num_processes N -m training ...` works on GPUs and,
with gloo, on CPU-only machines.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from codec.distributed import make_accelerator, shutdown
from codec.distributions import DiagonalGaussianDistribution
from codec.layers import preferred_memory_format
from codec.sources import SourceError
from training.config import ConfigError, TrainConfig, load_config, save_config
from training.data import IndexedImages, build_data, collate_indexed, images_in_full_steps
from training.discriminator import PatchGANDiscriminator, discriminator_step_loss, generator_step_loss
from training.export import MODEL_CONFIG
from training.losses import KLLoss, LPIPSLoss, PixelLoss
from training.model import TrainingAutoencoder, build_autoencoder
from training.records import append_metrics, append_validation_log, draw_curves, forget_after, forget_steps
from training.state import EMA, LoopState, RunningMeans, checkpoint_dir, prune_checkpoints, resolve_resume
from training.validation import collate_validation, save_grid, validate

log = logging.getLogger("training")


def posterior_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int, step: int) -> torch.Tensor:
    """Standard-normal noise per image from (seed, step, image index): the same draw on any number of processes."""
    draws = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 65_537 + index) % (2**63))
        draws.append(torch.randn(shape, generator=generator))
    return torch.stack(draws)


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


def train(config: TrainConfig, lpips_pretrained: bool = True) -> Path:
    """Run (or resume) training as configured; returns the output folder. `lpips_pretrained=False`: tests only."""
    from accelerate.utils import DataLoaderConfiguration, set_seed

    run = config.run
    output_dir = Path(run.output_dir)
    accelerator = make_accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=_available_tracker(run.log_with),
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The schedule counts optimizer steps (run.max_steps); a prepared scheduler would otherwise step once per
        # process at each of them, and N processes would run the warm-up and the cosine N times too fast.
        step_scheduler_with_optimizer=False,
    )
    try:
        return _train(accelerator, config, output_dir, lpips_pretrained, set_seed)
    finally:
        shutdown(accelerator)


def _train(accelerator, config: TrainConfig, output_dir: Path, lpips_pretrained: bool, set_seed) -> Path:
    run, opt_config, loss_config = config.run, config.optimizer, config.loss
    set_seed(run.seed)  # the same initial weights on every process
    # Every training batch has the same shape (fixed crops, drop_last), so cuDNN's one-off search for the fastest
    # convolution algorithms pays for itself within the first steps.
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if run.mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.is_main_process:
        # accelerate runs fp16 on a CPU as plain fp32 (no autocast, no loss scaling), without a word.
        log.warning("run.mixed_precision fp16: on a CPU accelerate trains in fp32; bf16 is the CPU's half precision")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir {output_dir}: is a file, not a folder")
    resume_from = resolve_resume(run.resume, output_dir)  # first: a refused run must not touch the folder
    if run.resume is True and resume_from is None and accelerator.is_main_process:
        log.warning("run.resume: no checkpoint in %s yet, so this is a new run from step 0", output_dir / "checkpoints")
    if resume_from is not None and accelerator.is_main_process:
        _log_changed_settings(output_dir / "config.yaml", config)
    train_images, val_images = build_data(config)  # before the run folder: bad data must not leave one behind
    full_steps = images_in_full_steps(config.run, len(train_images), accelerator.num_processes)
    # The model and LPIPS also come before the run folder: a model.init that does not load, or LPIPS weights
    # that cannot be downloaded, must not leave a folder holding only config.yaml.
    vae = build_autoencoder(config.model)
    lpips_loss = None
    if loss_config.lpips_weight > 0:
        lpips_loss = LPIPSLoss(loss_config.lpips_net, loss_config.lpips_weight, pretrained=lpips_pretrained)
        lpips_loss = lpips_loss.to(accelerator.device)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        vae.config.to_json(output_dir / MODEL_CONFIG)  # what training.export rebuilds, without model.init
    # The model keeps its conv weights in its device's layout (codec.layers.preferred_memory_format), and the
    # batches below follow: channels-last on a CPU, where an fp32 training step of the builtin config took 15 s
    # instead of 18 s (bf16 autocast 33 s: this CPU's bf16 convolution backward is slow, so the builtin config
    # trains in fp32); NCHW on a GPU, where ATen's GroupNorm would otherwise transpose around every norm.
    model = TrainingAutoencoder(vae)
    resolution = config.data.resolution
    pixel_loss = PixelLoss(loss_config.pixel, loss_config.pixel_weight)
    # kl_weight is in LDM's convention, where the reconstruction loss is summed over the 3*R*R values of an
    # image; ours are means over them, so the same balance needs the weight divided by that count.
    kl_loss = KLLoss(loss_config.kl_weight / (3 * resolution * resolution))
    use_disc = loss_config.disc_start is not None

    trainable = [p for p in model.parameters() if p.requires_grad]
    lr, disc_lr = config.learning_rates(accelerator.num_processes)
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=opt_config.betas, weight_decay=opt_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    ema = EMA(model.vae, opt_config.ema_decay) if opt_config.ema_decay else None

    generator = torch.Generator().manual_seed(run.seed)
    indexed = IndexedImages(train_images)
    train_loader = DataLoader(
        indexed,
        batch_size=run.batch_size,
        # Each epoch a shuffled subset of whole steps' worth: every optimizer step sees its full global batch
        # (accelerate would otherwise end an epoch with a short accumulation, at a fraction of the gradient).
        sampler=RandomSampler(indexed, num_samples=full_steps, generator=generator),
        drop_last=True,
        num_workers=config.data.num_workers,
        collate_fn=collate_indexed,
        generator=generator,
        # Workers that outlive the epoch: an epoch of the GPU recipe is about 60 steps, and starting 8 workers
        # afresh each time would stall the GPU once a minute (ImageDataset.set_epoch reaches them).
        persistent_workers=config.data.num_workers > 0,
    )
    val_loader = DataLoader(
        val_images, batch_size=run.batch_size, collate_fn=functools.partial(collate_validation, resolution=resolution)
    )

    prepared = [model, optimizer, train_loader, val_loader, scheduler]
    if use_disc:
        discriminator = PatchGANDiscriminator(layers=loss_config.disc_layers)
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        disc_optimizer = torch.optim.AdamW(
            discriminator.parameters(), lr=disc_lr, betas=opt_config.betas, weight_decay=opt_config.weight_decay
        )  # the configured decay (LDM: none, plain Adam); AdamW's own default would add 0.01
        prepared += [discriminator, disc_optimizer]
    prepared = accelerator.prepare(*prepared)
    model, optimizer, train_loader, val_loader, scheduler = prepared[:5]
    discriminator, disc_optimizer = prepared[5:] if use_disc else (None, None)

    state = LoopState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    disc_step = DiscriminatorStep(accelerator, disc_optimizer, resume_from) if use_disc else None
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if disc_step is not None:
            disc_step.register_late()
        _apply_configured_rates(scheduler.scheduler, lr, disc_optimizer, disc_lr)
        log.info("resumed from %s at step %d", resume_from, state.step)
    # A run killed after its checkpoint recorded steps it now trains again; a fresh run in a folder whose run died
    # before its first checkpoint starts the records afresh. (data_order counts from 0: step k's batch is read by
    # the k+1-th step.)
    if run.record_data_order:
        forget_steps(output_dir / f"data_order.rank{accelerator.process_index}.txt", lambda s: s < state.step)
    if accelerator.is_main_process:
        forget_after(output_dir, state.step)
        draw_curves(output_dir)  # without the dropped steps until the next validation redraws it
    if accelerator.log_with:  # the trackers it kept: none where the package is missing (warned once, above)
        accelerator.init_trackers("latent-codec", config={"resolution": resolution, "lr": lr, **_flat(config)})

    unwrapped = accelerator.unwrap_model(model)
    last_layer = unwrapped.vae.decoder.conv_out.weight
    latent_shape = unwrapped.vae.config.latent_shape(resolution, resolution)
    progress = _progress(accelerator, run.max_steps, state.step)
    start = time.perf_counter()
    # Skipped images and the logged losses are summed across processes only at log steps: a per-step reduce (or
    # loss.item()) would make the CPU wait for the GPU every step instead of queueing the next one.
    pending_skipped = pending_real = 0
    means = RunningMeans()
    while state.step < run.max_steps:
        train_images.set_epoch(state.epoch)
        train_loader.set_epoch(state.epoch)
        # skip_first_batches makes a new loader (and new workers) even for 0: only a resumed epoch needs it.
        batches = train_loader
        if state.batches_in_epoch:
            batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for batch in batches:
            state.batches_in_epoch += 1
            pending_skipped += batch["skipped"]
            pixels, indices = batch["pixels"], batch["indices"]
            # Every image of this process's batch unreadable: the step still runs, on a blank stand-in whose loss
            # counts for nothing, since a process that skipped alone would leave the others waiting in the
            # gradient all-reduce (and count its steps apart from theirs).
            blank = pixels is None
            if blank:
                pixels = torch.zeros(1, 3, resolution, resolution, device=accelerator.device)
                indices = torch.zeros(1, dtype=torch.int64)
            pixels = pixels.contiguous(memory_format=preferred_memory_format(pixels.device))
            if run.record_data_order:
                with open(output_dir / f"data_order.rank{accelerator.process_index}.txt", "a") as handle:
                    handle.write(f"{state.step} {' '.join(map(str, batch['indices'].tolist()))}\n")
            noise = posterior_noise(indices, latent_shape, run.seed, state.step).to(pixels.device)
            # One accumulate() for both models: each call advances Accelerate's micro-batch count, so a second
            # one for the discriminator made every micro-batch look like a step.
            with accelerator.accumulate(*([model, discriminator] if use_disc else [model])):
                model.train()
                reconstruction, moments = model(pixels, noise)
                posterior = DiagonalGaussianDistribution(moments)
                nll, logs = pixel_loss(reconstruction, pixels)
                if lpips_loss is not None:
                    perceptual, lpips_logs = lpips_loss(reconstruction, pixels)
                    nll, logs = nll + perceptual, {**logs, **lpips_logs}
                kl, kl_logs = kl_loss(posterior)
                loss, logs = nll + kl, {**logs, **kl_logs}
                if use_disc:
                    adversarial, g_logs = generator_step_loss(
                        accelerator.unwrap_model(discriminator),
                        reconstruction,
                        nll,
                        last_layer,
                        state.step,
                        loss_config.disc_start,
                        loss_config.disc_weight,
                        loss_config.adaptive_disc_weight,
                        # Read only once the discriminator runs: get_scale() waits for the GPU.
                        loss_scale=accelerator.scaler.get_scale()
                        if accelerator.scaler is not None and state.step >= loss_config.disc_start
                        else 1.0,
                    )
                    loss, logs = loss + adversarial, {**logs, **g_logs}
                accelerator.backward(loss * 0.0 if blank else loss)
                if accelerator.sync_gradients and opt_config.max_grad_norm:
                    clip_autoencoder_gradients(accelerator, optimizer, trainable, opt_config.max_grad_norm)
                optimizer.step()
                step_schedules(accelerator, optimizer, scheduler, ema, unwrapped.vae)
                optimizer.zero_grad(set_to_none=True)
                if use_disc:
                    d_loss, d_logs = discriminator_step_loss(
                        discriminator, pixels, reconstruction, state.step, loss_config.disc_start
                    )
                    if d_loss.requires_grad:
                        disc_step(d_loss * 0.0 if blank else d_loss)
                    logs = {**logs, **d_logs}
            means.add({**logs, "loss": loss}, weight=0.0 if blank else 1.0)  # every real micro-batch counts
            pending_real += not blank
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            last = state.step == run.max_steps
            at_log_step = state.step % run.log_every == 0 or state.step % run.checkpoint_every == 0
            if not last and _out_of_time(accelerator, run.time_limit_minutes, start, at_log_step):
                log.warning("run.time_limit_minutes reached at step %d of %d: stopping", state.step, run.max_steps)
                last = True
            if at_log_step or last:  # the skipped-image count is summed here, so before every checkpoint
                state.skipped_images += _sum_over_processes(accelerator, pending_skipped)
                if not _sum_over_processes(accelerator, pending_real):  # the same total, so every rank stops
                    raise SourceError(
                        f"{config.data.train}: every image read since the last log step was unreadable "
                        f"({state.skipped_images} skipped so far; the reasons are logged above)"
                    )
                pending_skipped = pending_real = 0
                lr = scheduler.get_last_lr()[0]
                _log_step(accelerator, state, {**means.read(accelerator), "lr": lr}, progress, start, output_dir)
            if state.step % run.validate_every == 0 or last:
                _validate(accelerator, unwrapped.vae, ema, val_loader, pixel_loss, lpips_loss, state, output_dir)
            if state.step % run.checkpoint_every == 0 or last:
                _checkpoint(accelerator, output_dir, state, run.checkpoints_to_keep)
            if last:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
            continue
        break  # the inner loop's break: the last step, or out of time
    progress.close()
    if run.export and accelerator.is_main_process:
        _export(unwrapped.vae, ema, output_dir / "final")
    return output_dir


def _available_tracker(name: str | None) -> str | None:
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
    unscales every prepared optimizer's, and the discriminator's micro-batches accumulated so far were then
    unscaled twice, which all but erased them."""
    accelerator.unscale_gradients(optimizer=optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class DiscriminatorStep:
    """The discriminator's backward and optimizer step. Under fp16 it has a loss scaler of its own: sharing
    Accelerate's one ran its update() twice per step, and an update between the discriminator's micro-batches
    unscaled the earlier ones with a scale other than theirs (torch's amp notes: one update per scaler per step)."""

    def __init__(self, accelerator, optimizer, resume_from: Path | None = None) -> None:
        self.accelerator, self.optimizer = accelerator, optimizer
        self.scaler, self._late = None, False
        if accelerator.scaler is not None:
            self.scaler = torch.amp.GradScaler(accelerator.device.type)
            optimizer.scaler = self.scaler  # AcceleratedOptimizer.step steps and updates through its .scaler
            # A checkpoint saved without it (before it existed, or by a bf16 run) holds one object fewer, and
            # load_state refuses a count that differs: then it joins after loading, starting at the shared scale.
            index = len(accelerator._custom_objects)
            if resume_from is None or (Path(resume_from) / f"custom_checkpoint_{index}.pkl").is_file():
                accelerator.register_for_checkpointing(self.scaler)
            else:
                self._late = True

    def register_late(self) -> None:
        if self._late:
            self.scaler.load_state_dict(self.accelerator.scaler.state_dict())
            self.accelerator.register_for_checkpointing(self.scaler)
            self._late = False

    def __call__(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            self.accelerator.backward(loss)
        else:  # as accelerator.backward does, with this scaler
            self.scaler.scale(loss / self.accelerator.gradient_accumulation_steps).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _apply_configured_rates(scheduler, lr: float, disc_optimizer, disc_lr: float | None) -> None:
    """A checkpoint restores the learning rates it was saved with; a resumed run uses the configured ones (the
    schedule's shape comes from the config already, the lambda not being saved)."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    if disc_optimizer is not None:
        for group in disc_optimizer.param_groups:
            group["lr"] = disc_lr


def _log_changed_settings(saved: Path, config: TrainConfig) -> None:
    """Say which settings a resumed run changes, before config.yaml is rewritten with them."""
    try:
        before = _flat(load_config(saved))
    except Exception:  # a missing or unreadable record only loses the message
        return
    changed = [
        f"{key} {before.get(key)} -> {value}"
        for key, value in _flat(config).items()
        if key != "run.resume" and before.get(key) != value
    ]
    if changed:
        log.warning("resuming with changed settings (they apply from here on): %s", "; ".join(changed))


def _flat(config: TrainConfig) -> dict:
    from dataclasses import asdict

    flat = {}
    for section, values in asdict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _progress(accelerator, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_main_process, desc="train", unit="step")


def _sum_over_processes(accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum"))


def _out_of_time(accelerator, limit_minutes: float | None, start: float, at_log_step: bool) -> bool:
    """Whether any process has run past the limit.

    One process checks after every step: the clock costs nothing. Several decide together, or one would stop alone
    and hang the others; that takes a collective, which waits for the device, so they decide only at log steps.
    """
    if limit_minutes is None:
        return False
    over = time.perf_counter() - start > 60 * limit_minutes
    if accelerator.num_processes == 1:
        return over
    return at_log_step and _sum_over_processes(accelerator, int(over)) > 0


def _log_step(accelerator, state: LoopState, means: dict[str, float], progress, start, output_dir: Path) -> None:
    """Log the means since the last log step (over micro-batches and processes) and the learning rate."""
    progress.set_postfix(loss=f"{means['loss']:.4f}", skipped=state.skipped_images)
    means = {**means, "skipped_images": state.skipped_images}
    means["steps_per_second"] = progress.n / max(time.perf_counter() - start, 1e-9)
    accelerator.log({f"train/{key}": value for key, value in means.items()}, step=state.step)
    if accelerator.is_main_process:
        append_metrics(output_dir, state.step, "train", means)


def _validate(accelerator, vae, ema, loader, pixel_loss, lpips_loss, state, output_dir) -> None:
    averaged = vae
    if ema is not None:
        averaged = copy.deepcopy(vae)
        ema.copy_to(averaged)
    metrics, samples = validate(accelerator, averaged, loader, pixel_loss, lpips_loss)
    if ema is not None:
        # The average trails the weights by about 1 / (1 - decay) steps: in a short run that is still improving
        # fast (the GPU recipe gained 1 dB in its last 700 steps), the trained weights themselves can be the
        # better model. Their PSNR beside the average's says which export (EMA or --no-ema) to keep.
        trained, _ = validate(accelerator, vae, loader, pixel_loss, lpips_loss)
        if "psnr" in trained:
            metrics["trained_psnr"] = trained["psnr"]
    vae.train()
    accelerator.log({f"val/{key}": value for key, value in metrics.items()}, step=state.step)
    if accelerator.is_main_process:
        log.info("step %d validation: %s", state.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        append_validation_log(output_dir, state.step, metrics)
        append_metrics(output_dir, state.step, "validation", metrics)
        draw_curves(output_dir)
        save_grid(samples, output_dir / "samples" / f"step-{state.step:07d}.png", f"step {state.step}")


def _checkpoint(accelerator, output_dir: Path, state: LoopState, keep: int) -> None:
    """save_state into a temporary folder renamed when complete, so a crash never leaves half a checkpoint."""
    final = checkpoint_dir(output_dir, state.step)
    partial = final.with_name(final.name + ".partial")
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replaced = final.with_name(final.name + ".replaced")
        if final.exists():  # saved again at the same step: moved aside, never deleted before its successor is in
            final.rename(replaced)
        partial.rename(final)
        if replaced.exists():
            import shutil

            shutil.rmtree(replaced)
        prune_checkpoints(output_dir, keep, final)
    accelerator.wait_for_everyone()


def _export(vae, ema, folder: Path) -> None:
    """The final weights (the EMA when there is one) as a diffusers folder and an LDM single file."""
    if ema is not None:
        vae = copy.deepcopy(vae)
        ema.copy_to(vae)
    vae.save_pretrained(folder)
    vae.save_single_file(folder / "vae.safetensors")
    log.info("exported %s and %s", folder, folder / "vae.safetensors")
