"""LPIPS (the `lpips` package, v0.1 heads) with the AlexNet and VGG trunks, or a plain 'unavailable'.

The linear heads ship inside the lpips package; the trunks are torchvision's ImageNet weights, fetched into the
torch hub cache on first use. Offline and uncached, a trunk cannot be built: that backbone is then reported as
unavailable, with the reason. A randomly initialised trunk would give numbers that look plausible and mean
nothing, so it is never used for reported figures (`random_trunk=True` exists for plumbing tests only).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

NETS = ("alex", "vgg")
# The smallest side each trunk's pooling leaves a feature map for (measured: AlexNet fails at 30, VGG at 15).
MIN_SIDE = {"alex": 31, "vgg": 16}
_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights"}


@dataclass
class LPIPSMetric:
    net: str
    model: torch.nn.Module | None
    reason: str | None = None  # why it is unavailable
    random_trunk: bool = False

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, reference: np.ndarray, reconstruction: np.ndarray) -> float | None:
        """LPIPS between two (H, W, 3) uint8 images; None when unavailable or the images are too small for it."""
        if self.model is None or min(reference.shape[:2]) < MIN_SIDE[self.net]:
            return None
        device = next(self.model.parameters()).device
        a = torch.from_numpy(reference).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        b = torch.from_numpy(reconstruction).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        return float(self.model(a.to(device), b.to(device)).mean())


def _is_download_failure(error: BaseException) -> bool:
    # URLError, DNS and SSL errors, timeouts are OSErrors; a damaged download fails torch.hub's hash check.
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and "hash" in str(error).lower())


def _hint(net: str) -> str:
    import torch.hub

    return (
        f"torchvision's ImageNet {_WEIGHTS[net]} are not in the torch hub cache ({torch.hub.get_dir()}/checkpoints) "
        "and could not be downloaded; copy them there to enable it"
    )


def load_lpips(net: str, device: torch.device, random_trunk: bool = False) -> LPIPSMetric:
    """The LPIPS metric for `net`, or an unavailable one whose `reason` says why."""
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {', '.join(NETS)}, not {net!r}")
    try:
        import lpips
    except ImportError as error:
        return LPIPSMetric(net, None, f"the lpips package is not installed ({error})")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)  # torchvision's `pretrained=` deprecation noise
            model = lpips.LPIPS(net=net, pnet_rand=random_trunk, verbose=False)
    except Exception as error:
        if _is_download_failure(error):
            return LPIPSMetric(net, None, f"{_hint(net)} ({type(error).__name__}: {error})")
        raise
    model = model.to(device).eval().requires_grad_(False)
    return LPIPSMetric(net, model, None, random_trunk)
