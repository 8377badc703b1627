"""The model being trained: built from the run config, with the parts that do not train frozen, and wrapped
so that one forward through the prepared (DDP) module runs encoder, sampling and decoder together."""

from __future__ import annotations

import torch
from torch import nn

from codec import AutoencoderKL, AutoencoderKLConfig, preset
from training.config import ModelConfig


def build_autoencoder(config: ModelConfig) -> AutoencoderKL:
    if config.init:
        vae = AutoencoderKL.load(config.init)
    elif config.preset:
        vae = AutoencoderKL(preset(config.preset))
    else:
        # A config written for this run: a misspelt key must stop it, not train a default architecture.
        vae = AutoencoderKL(AutoencoderKLConfig.from_json(config.config, strict=True))
    vae = vae.float().train()
    if config.init_logvar is not None:
        start_logvar_at(vae, config.init_logvar)
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if config.decoder_only:
        # The latent space stays exactly as it was, so diffusion models trained on it keep working.
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    return vae


def start_logvar_at(vae: AutoencoderKL, logvar: float) -> None:
    """Shift the bias of the layer that outputs the posterior's log-variance so that it starts near `logvar`.

    The last layer producing the moments is quant_conv (or the encoder's conv_out without it); its second half
    of output channels is the log-variance. Only the bias moves: the initial means, and every gradient path,
    stay as they were.
    """
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    latent = vae.config.latent_channels
    with torch.no_grad():
        last.bias[latent:] += logvar


def frozen_encoder(vae: AutoencoderKL) -> bool:
    return not any(p.requires_grad for p in vae.encoder.parameters())


class TrainingAutoencoder(nn.Module):
    """`forward(pixels, noise) -> (reconstruction, moments)` in one call, for DDP's gradient hooks.

    Calling `vae.encode` on the unwrapped model would bypass DDP's gradient synchronisation (a known bug of
    diffusers' research training script); everything the loss needs comes out of this single forward.
    `noise` is the standard-normal draw for posterior sampling, made by the caller so that each image's draw
    depends on the image and the step, not on which process it landed on.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if frozen_encoder(self.vae):
            with torch.no_grad():
                moments = self.vae.encode_moments(pixels)
        else:
            moments = self.vae.encode_moments(pixels)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.dtype)
        return self.vae.decode_raw(z), moments
