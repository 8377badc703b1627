"""Reconstruction and regularisation losses for fine-tuning the VAE: pixel, LPIPS and KL.

Each loss is an `nn.Module` whose forward returns `(loss, logs)`: `loss` is a scalar tensor already multiplied
by the loss's weight, so the trainer just adds them up; `logs` maps names to detached scalar tensors (the raw,
unweighted value and the weighted contribution). They stay on the device: turning them into Python floats every
step would make the CPU wait for the GPU each time; the trainer averages them and reads them at log steps only.

The adversarial part lives in `training.discriminator`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
from torch import nn

from codec.distributions import DiagonalGaussianDistribution

Logs = dict[str, torch.Tensor | float]  # detached scalars, read at log steps
LPIPSNet = Literal["vgg", "alex"]

# torchvision's weight enums for the LPIPS trunks, to name the file a user has to fetch when it is missing.
_BACKBONE_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights"}
_BACKBONE_BUILDERS = {"vgg": "vgg16", "alex": "alexnet"}


class PixelLoss(nn.Module):
    """Mean absolute (`l1`) or squared (`l2`) error over every element (batch, channels, pixels), times `weight`."""

    def __init__(self, kind: Literal["l1", "l2"] = "l1", weight: float = 1.0) -> None:
        super().__init__()
        if kind not in ("l1", "l2"):
            raise ValueError(f"pixel loss kind must be 'l1' or 'l2', not {kind!r}")
        self.kind = kind
        self.weight = weight

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        # In fp32: under bf16/fp16 autocast the decoder's output is low precision, and a mean over millions of
        # small differences loses most of its digits there.
        diff = reconstruction.float() - target.float()
        raw = diff.abs().mean() if self.kind == "l1" else diff.square().mean()
        loss = self.weight * raw
        return loss, {f"pixel_{self.kind}": raw.detach(), "pixel_loss": loss.detach()}


class LPIPSUnavailable(RuntimeError):
    """LPIPS's ImageNet-pretrained trunk is not in the torch hub cache and could not be downloaded."""


def _is_download_failure(error: BaseException) -> bool:
    # URLError/HTTPError, DNS, SSL, timeouts and unreachable networks are all OSErrors; a file that arrives
    # damaged fails torch.hub's hash check with a RuntimeError naming the hash.
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and "hash" in str(error).lower())


def _unavailable_message(net: str, error: BaseException) -> str:
    import torch.hub

    try:
        import torchvision.models

        url = getattr(torchvision.models, _BACKBONE_WEIGHTS[net]).IMAGENET1K_V1.url
    except (ImportError, AttributeError):  # an older/newer torchvision: the hint still names the builder
        url = "the torchvision ImageNet weights"
    cache = f"{torch.hub.get_dir()}/checkpoints"
    builder = _BACKBONE_BUILDERS[net]
    return (
        f"LPIPS(net={net!r}) needs torchvision's ImageNet-pretrained {builder} weights, which are not in the torch "
        f"hub cache ({cache}) and could not be fetched ({type(error).__name__}: {error}). Either pre-download them "
        f'there (on a machine with internet and the same TORCH_HOME: python -c "import torchvision; '
        f"torchvision.models.{builder}(weights='IMAGENET1K_V1')\", or copy {url} into {cache}/), "
        f"or train without LPIPS by setting loss.lpips_weight=0."
    )


def _build_lpips(net: LPIPSNet, pretrained: bool) -> nn.Module:
    # Imported here: lpips pulls in torchvision, which only LPIPS training needs.
    import lpips

    if net not in _BACKBONE_WEIGHTS:
        raise ValueError(f"LPIPS net must be one of {sorted(_BACKBONE_WEIGHTS)}, not {net!r}")
    try:
        with warnings.catch_warnings():
            # lpips still passes torchvision's deprecated `pretrained=`; the warning is noise for our users.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
            # The linear heads always come from lpips' own package files; only the trunk may need a download.
            return lpips.LPIPS(net=net, pnet_rand=not pretrained, verbose=False)
    except Exception as error:
        # Never fall back to a random trunk: the loss would run, look plausible, and teach the decoder nothing.
        if pretrained and _is_download_failure(error):
            raise LPIPSUnavailable(_unavailable_message(net, error)) from error
        raise


@functools.cache
def lpips_available(net: LPIPSNet = "vgg") -> bool:
    """Whether `LPIPSLoss(net, pretrained=True)` can be built here (trunk weights cached or downloadable).

    Builds the network once per `net` and caches the answer for the process (`lpips_available.cache_clear()`
    forgets it). Costs a full trunk construction the first time, so call it once at start-up, not per step.
    """
    try:
        _build_lpips(net, pretrained=True)
    except LPIPSUnavailable:
        return False
    return True


class LPIPSLoss(nn.Module):
    """LPIPS distance between reconstruction and target, mean over the batch, times `weight`.

    Inputs are images in [-1, 1] (lpips' convention, and the VAE's). The LPIPS network is frozen and stays in
    eval mode whatever `.train()` the trainer calls; gradients flow through it to the reconstruction.
    `pretrained=False` uses a random trunk (tests only); `pretrained=True` raises `LPIPSUnavailable` when the
    trunk's weights can be neither found nor downloaded.
    """

    def __init__(self, net: LPIPSNet = "vgg", weight: float = 1.0, pretrained: bool = True) -> None:
        super().__init__()
        self.net = net
        self.weight = weight
        self.lpips = _build_lpips(net, pretrained)
        # A fixed metric: no optimizer must see its parameters, and nothing should accumulate .grad on them.
        self.lpips.requires_grad_(False)
        self.lpips.eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        super().train(mode)
        # lpips' linear heads contain dropout: in train mode the metric would be random and no longer LPIPS.
        self.lpips.eval()
        return self

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        # Deliberately not under torch.no_grad(): the loss is useless without its gradient to the reconstruction
        # (diffusers' research train_autoencoderkl.py computes LPIPS under no_grad, so there it trains nothing).
        dtype = next(self.lpips.parameters()).dtype  # a half-precision decoder output meets an fp32 metric
        target = target.detach().to(dtype)
        raw = self.lpips(reconstruction.to(dtype), target).float().mean()  # (B, 1, 1, 1) -> mean over the batch
        loss = self.weight * raw
        return loss, {"lpips": raw.detach(), "lpips_loss": loss.detach()}


class KLLoss(nn.Module):
    """KL(q(z|x) || N(0, I)) of the encoder's posterior, times `weight`, in LDM's convention.

    Convention (LDM's `LPIPSWithDiscriminator`): the KL is summed over every latent element (C, H, W) of a
    sample, then averaged over the batch: `loss = weight * posterior.kl().sum() / batch_size`. That sum runs over
    thousands of elements (4 x 32 x 32 = 4096 for a 256x256 image) while `PixelLoss` is a per-element mean, so
    the KL term is large next to the reconstruction term, which is why its weight is tiny (default 1e-6).

    Beware when copying LDM's `kl_weight`: LDM sums its reconstruction loss over C, H, W as well, whereas
    `PixelLoss` and `LPIPSLoss` here average. For the same balance as LDM's weight `w` at images of C x H x W,
    use `w / (C * H * W)`; the same number 1e-6 here weighs the KL 3 * H * W times more than in LDM.
    """

    def __init__(self, weight: float = 1e-6) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, posterior: DiagonalGaussianDistribution) -> tuple[torch.Tensor, Logs]:
        kl = posterior.kl().float()  # (B,): sum over C, H, W per sample; fp32 because that sum is large
        raw = kl.sum() / kl.shape[0]
        loss = self.weight * raw
        return loss, {"kl": raw.detach(), "kl_loss": loss.detach()}
