"""GroupNorm with the activation that follows it fused in, and statistics that can be shared across tiles.

A tile normalised with its own statistics drifts in tone from its neighbours (diffusers' tiled decode shows a
grid for this reason). Tiled inference here can instead record each norm's per-group mean and variance once
and make every tile use the same numbers, so tiles agree with each other and with the untiled result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "mish": F.mish,
}

# Activations that can overwrite the norm's output in place when no gradient needs it (saves a full-size copy).
_IN_PLACE = {"silu", "swish", "relu", "mish"}

StatsHook = Callable[["GroupNorm", torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same `weight`/`bias` keys) followed by an optional activation.

    `stats_hook`, when set, is called with (module, input) and may return a (mean, var) pair, each of shape
    (batch, groups), to normalise with instead of the input's own statistics. Tiling sets it; nothing else does.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, act: str | None = None) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = _ACTIVATIONS[act] if act else None
        self.act_in_place = act in _IN_PLACE
        self.stats_hook: StatsHook | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.stats_hook(self, x) if self.stats_hook is not None else None
        if stats is None:
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            y = normalize_with(x, self.num_groups, *stats, self.weight, self.bias, self.eps)
        if self.act is None:
            return y
        if self.act_in_place and not y.requires_grad:
            return self.act(y, inplace=True)
        return self.act(y)


def group_moments(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-(sample, group) sum and sum of squares in fp32, and the element count, for pooling over tiles."""
    b = x.shape[0]
    grouped = x.reshape(b, num_groups, -1).float()
    return grouped.sum(-1), grouped.square().sum(-1), grouped.shape[-1]


def normalize_with(
    x: torch.Tensor,
    num_groups: int,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Group-normalise `x` with given per-(sample, group) statistics instead of its own."""
    b, c = x.shape[:2]
    per_channel = c // num_groups
    scale = torch.rsqrt(var.float() + eps).repeat_interleave(per_channel, dim=1)  # (B, C)
    shift = -mean.float().repeat_interleave(per_channel, dim=1) * scale
    scale = scale * weight.float()
    shift = shift * weight.float() + bias.float()
    view = (b, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))
