"""PatchGAN discriminator and the two GAN steps of LDM's `LPIPSWithDiscriminator`, made explicit.

One training iteration with the adversarial loss:

    rec = vae.decode_raw(z)
    nll, _ = ...pixel + LPIPS losses of (rec, x)...
    g, g_logs = generator_step_loss(disc, rec, nll, vae.decoder.conv_out.weight, step, disc_start, disc_weight)
    (nll + kl + g).backward(); vae_opt.step()            # the discriminator gets no gradient from this
    d, d_logs = discriminator_step_loss(disc, x, rec, step, disc_start)
    if d.requires_grad: d.backward(); disc_opt.step()   # the VAE gets no gradient from this

Before `disc_start` both losses are exactly 0, the discriminator is not run, and `d` does not require grad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

Logs = dict[str, torch.Tensor | float]  # detached scalars, read at log steps


class PatchGANDiscriminator(nn.Module):
    """pix2pix's NLayerDiscriminator as LDM uses it: one real/fake logit per overlapping patch.

    4x4 convolutions; the first `layers` have stride 2, each doubling the channels (up to 8x `channels`); then a
    stride-1 conv and a 1-channel output conv. LeakyReLU(0.2) between them, BatchNorm after every conv but the
    first and last. Layers sit in `self.main` as in LDM/taming, so their discriminator weights load by key.

    BatchNorm is LDM's choice; under DDP the trainer should convert it with
    `nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)` so the statistics span the whole global batch.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"the discriminator needs at least one strided layer, got layers={layers}")
        # No conv bias before a BatchNorm: the norm's own bias makes it redundant (as in pix2pix/LDM).
        stack: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers):
            prev, mult = mult, min(2**n, 8)
            stack += [
                nn.Conv2d(channels * prev, channels * mult, 4, 2, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**layers, 8)
        stack += [
            nn.Conv2d(channels * prev, channels * mult, 4, 1, 1, bias=False),
            nn.BatchNorm2d(channels * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(channels * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*stack)
        self.apply(_ldm_weights_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> logits (B, 1, h, w), one per patch; > 0 means 'real'."""
        return self.main(images)


def _ldm_weights_init(module: nn.Module) -> None:
    # LDM's (pix2pix's) init. Like LDM, the two conv biases (first and last conv) keep PyTorch's default.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):  # also SyncBatchNorm after conversion
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -mean(logits_fake)."""
    return -logits_fake.float().mean()


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """LDM's balance: ||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, max_weight].

    Scales the adversarial gradient to the reconstruction gradient's size at the decoder's last layer. Detached;
    `retain_graph=True` leaves both graphs for the trainer's backward (at the price of two extra partial backward
    passes through the decoder's head). Under fp16 autocast the gradients flowing back through the head are fp16,
    and a mean over millions of pixels gives each pixel one too small for it (1/N under 6e-8 is 0): both losses
    are multiplied by `loss_scale` (the GradScaler's scale) first, and the ratio taken in the same units. A
    non-finite result (the scale overflowed, as the GradScaler will also find) counts as 0 for the step.
    """
    nll_grads = torch.autograd.grad(nll_loss * loss_scale, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss * loss_scale, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads.float()) / (torch.norm(g_grads.float()) + 1e-4 * loss_scale)
    weight = torch.nan_to_num(weight, nan=0.0, posinf=0.0)
    return torch.clamp(weight, 0.0, max_weight).detach()


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, `module`'s parameters do not require grad; each gets its own previous flag back after.

    A forward run inside records no path to those parameters, so a later backward of anything computed from it
    leaves their `.grad` untouched while still flowing through the module to its inputs.
    """
    params = list(module.parameters())
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous, strict=True):
            p.requires_grad_(flag)


def discriminator_active(step: int, disc_start: int) -> bool:
    """LDM's `adopt_weight`: the GAN terms count from `step == disc_start` on."""
    return step >= disc_start


def _inactive(reference: torch.Tensor, logs: Logs) -> tuple[torch.Tensor, Logs]:
    # A constant that does not require grad: adding it to the VAE's loss is harmless, and backward on it alone
    # fails loudly instead of silently stepping (and weight-decaying) an untrained discriminator.
    return torch.zeros((), device=reference.device, dtype=torch.float32), {**logs, "disc_active": 0.0}


def generator_step_loss(
    discriminator: nn.Module,
    reconstruction: torch.Tensor,
    nll_loss: torch.Tensor,
    last_layer: torch.Tensor | None,
    step: int,
    disc_start: int,
    disc_weight: float,
    adaptive: bool = True,
    max_weight: float = 1e4,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, Logs]:
    """The adversarial term of the VAE's loss: `disc_weight * adaptive_weight * -mean(D(reconstruction))`.

    `nll_loss` is the reconstruction loss (pixel + LPIPS, weighted) and `last_layer` the decoder's last weight
    (`vae.decoder.conv_out.weight`); both only matter when `adaptive`, otherwise the adaptive weight is 1.
    `loss_scale`: fp16's GradScaler scale, see adaptive_weight.
    The discriminator runs with its parameters frozen, so the VAE's backward puts no gradient into them.
    Under torch.no_grad (validation) there are no gradients to compare and, as in LDM, the adaptive weight is 0.
    Before `disc_start`: exactly 0, and the discriminator is not run.
    """
    if not discriminator_active(step, disc_start):
        return _inactive(reconstruction, {"g_adv": 0.0, "adaptive_weight": 0.0, "g_adv_loss": 0.0})
    with frozen(discriminator):
        logits_fake = discriminator(reconstruction)
    g_loss = generator_adversarial_loss(logits_fake)
    if not adaptive:
        weight = torch.ones((), device=g_loss.device)
    elif last_layer is None:
        raise ValueError("adaptive=True needs last_layer (the decoder's last weight, vae.decoder.conv_out.weight)")
    elif torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad:
        weight = adaptive_weight(nll_loss, g_loss, last_layer, max_weight, loss_scale)
    else:
        weight = torch.zeros((), device=g_loss.device)
    loss = disc_weight * weight * g_loss
    logs = {"g_adv": g_loss.detach(), "adaptive_weight": weight.detach(), "g_adv_loss": loss.detach()}
    return loss, {**logs, "disc_active": 1.0}


def discriminator_step_loss(
    discriminator: nn.Module,
    real: torch.Tensor,
    reconstruction: torch.Tensor,
    step: int,
    disc_start: int,
) -> tuple[torch.Tensor, Logs]:
    """The discriminator's hinge loss on real images and reconstructions.

    Both inputs are detached here, so this step can never put gradient into the autoencoder, whatever graph the
    trainer still holds. Before `disc_start`: exactly 0 (not requiring grad), and the discriminator is not run;
    skip its backward and optimizer step then (check `logs["disc_active"]` or `loss.requires_grad`).
    """
    if not discriminator_active(step, disc_start):
        return _inactive(reconstruction, {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0})
    # Two passes, as in LDM: each batch's BatchNorm statistics are its own (all real, then all fake).
    logits_real = discriminator(real.detach())
    logits_fake = discriminator(reconstruction.detach())
    loss = hinge_d_loss(logits_real, logits_fake)
    logs = {"d_loss": loss.detach(), "logits_real": logits_real.detach().float().mean()}
    return loss, {**logs, "logits_fake": logits_fake.detach().float().mean(), "disc_active": 1.0}
