"""The encoder's output: a diagonal Gaussian over the latent, as in LDM and diffusers."""

from __future__ import annotations

import math

import torch

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp: keeps exp(logvar) finite in fp32 and std away from exact zero


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) per latent value; `parameters` holds mean and logvar stacked on channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, *LOGVAR_RANGE)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * N(0, I). A list holds one generator per image (as diffusers' randn_tensor takes), so each
        image's draw depends on its own generator alone."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {self.mean.shape[0]}")
            noise = torch.cat([self._noise(g, self.mean.shape[1:])[None] for g in generator])
        else:
            noise = self._noise(generator, self.mean.shape)
        return self.mean + self.std * noise

    def _noise(self, generator: torch.Generator | None, shape) -> torch.Tensor:
        # Drawn on the generator's device, then moved, so a CPU generator gives the same sample on any device.
        device = generator.device if generator is not None else self.mean.device
        return torch.randn(shape, generator=generator, device=device, dtype=self.mean.dtype).to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL divergence to `other` (default N(0, I)), summed over C, H, W: one value per sample."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.square() + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).square() / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).square() / self.var, dim=list(dims))
