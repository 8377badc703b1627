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
    (batch, groups), to normalise with instead of the input's own statistics. Tiling sets it.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, act: str | None = None) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = _ACTIVATIONS[act] if act else None
        self.act_in_place = act in _IN_PLACE
        self.stats_hook: StatsHook | None = None

    def forward(
        self,
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Normalise (and activate) `x`; into `out` when given (row streaming writes into a conv's input buffer);
        with `stats`, a (mean, var) pair of shape (batch, groups), instead of any hook's or x's own."""
        if stats is None and self.stats_hook is not None:
            stats = self.stats_hook(self, x)
        if stats is None:
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            y = y if out is None else out.copy_(y)
        else:
            y = normalize_with(x, self.num_groups, *stats, self.weight, self.bias, self.eps, out=out)
        if self.act is None:
            return y
        if self.act_in_place and not y.requires_grad:
            return self.act(y, inplace=True)
        return self.act(y) if out is None else out.copy_(self.act(y))


def group_stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and (biased) variance in fp32, as F.group_norm computes them.

    Reduced per channel first and then combined: a (B, groups, -1) view of a channels-last activation would be
    a full-size copy, and so would squaring it; per-channel var_mean needs neither.
    """
    b, c = x.shape[:2]
    var, mean = torch.var_mean(x if x.dtype == torch.float32 else x.float(), dim=tuple(range(2, x.dim())), correction=0)
    mean, second = mean.view(b, num_groups, c // num_groups), (var + mean.square()).view(b, num_groups, -1)
    group_mean = mean.mean(-1)
    return group_mean, (second.mean(-1) - group_mean.square()).clamp_min(0.0)


class ChannelMoments:
    """Per-(sample, channel) count, mean and sum of squared deviations, accumulated over pieces of a tensor
    (bands of rows) and combined exactly (Chan et al.'s parallel update, in fp64), then reduced to the groups'
    mean and variance: what `group_stats` would give on the whole tensor, without ever holding it."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        count = x.numel() // max(1, x.shape[0] * x.shape[1])
        if count == 0:
            return
        var, mean = torch.var_mean(
            x if x.dtype == torch.float32 else x.float(), dim=tuple(range(2, x.dim())), correction=0
        )
        mean, m2 = mean.double(), var.double() * count
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def group_stats(self, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.m2 is None:
            raise ValueError("no values were accumulated")
        b, c = self.mean.shape
        mean = self.mean.view(b, num_groups, c // num_groups)
        second = (self.m2 / self.count + self.mean.square()).view(b, num_groups, -1)
        group_mean = mean.mean(-1)
        group_var = (second.mean(-1) - group_mean.square()).clamp_min(0.0)
        return group_mean.float(), group_var.float()


def normalize_with(
    x: torch.Tensor,
    num_groups: int,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-normalise `x` with given per-(sample, group) statistics instead of its own (into `out` if given)."""
    b, c = x.shape[:2]
    per_channel = c // num_groups
    scale = torch.rsqrt(var.float() + eps).repeat_interleave(per_channel, dim=1)  # (B, C)
    shift = -mean.float().repeat_interleave(per_channel, dim=1) * scale
    scale = scale * weight.float()
    shift = shift * weight.float() + bias.float()
    view = (b, c) + (1,) * (x.dim() - 2)
    shift, scale = shift.view(view).to(x.dtype), scale.view(view).to(x.dtype)
    return torch.addcmul(shift, x, scale) if out is None else torch.addcmul(shift, x, scale, out=out)
