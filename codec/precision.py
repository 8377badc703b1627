"""The precision an inference pass computes in, and its fallbacks, in one place (`Fallbacks`).

torch runs bf16 and fp16 convolutions on a CPU through emulation unless the CPU has the instructions for them
(AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16), and emulated they are about ten times slower than fp32
(docs/tiling.md has the figures). So inference with half-precision weights on such a CPU computes with an fp32
copy of the model and returns its result in the model's dtype: faster, and more accurate. The copy is made once
per model, and its weights refreshed at each use. The same copy recomputes a half-precision result that
overflowed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import weakref
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)

_copies: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()

Check = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cpu_supports(check_name: str) -> bool:
    # Private helpers of torch.cpu (used by inductor); a torch without one is taken as lacking the feature.
    check = getattr(torch.cpu, check_name, None)
    return check is not None and bool(check())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX); without, torch emulates it, far slower than fp32."""
    return _cpu_supports("_is_avx512_bf16_supported") or _cpu_supports("_is_amx_tile_supported")


def cpu_has_native_fp16() -> bool:
    """Whether this CPU runs fp16 matrix work natively (AMX-FP16)."""
    return _cpu_supports("_is_amx_fp16_supported")


def emulated_on_cpu(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `dtype` on `device` is a half precision that this CPU would emulate."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return not cpu_has_native_bf16()
    if dtype == torch.float16:
        return not cpu_has_native_fp16()
    return False


def fp32_copy(model: nn.Module) -> nn.Module:
    """An fp32 copy of `model` with its current weights and inference settings. The module is made once per
    model (again if its parameters change shape or number); its weights are copied from the original at every
    call, since no cheap check sees every way a weight can change (a write through `param.data`, as diffusers'
    EMAModel.copy_to does, leaves the version counter alone) and the copy costs little next to a forward pass."""
    key = tuple((tuple(p.shape), p.device) for p in model.parameters())
    cached = _copies.get(model)
    if cached is None or cached[0] != key:
        log.debug("making a float32 copy of a %s model", model.dtype)
        # Made outside inference mode even when called inside it: its weights are refreshed in place at later
        # calls, which torch refuses for inference tensors outside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, copy.deepcopy(model).float())
        _copies[model] = cached
    else:
        with torch.no_grad():
            replica_tensors = list(cached[1].parameters()) + list(cached[1].buffers())
            torch._foreach_copy_(replica_tensors, list(model.parameters()) + list(model.buffers()))
    replica = cached[1]
    # The original's settings as they are now: plain values, and settings objects (dataclasses) shared, derived
    # rather than listed so that a new setting cannot be forgotten here; `training` is nn.Module's own, per module.
    for name, value in vars(model).items():
        plain = isinstance(value, (bool, int, float, str, type(None)))
        settings = dataclasses.is_dataclass(value) and not isinstance(value, type)
        if (plain or settings) and not name.startswith("_") and name != "training":
            setattr(replica, name, value)
    return replica


def forget_fp32_copy(model: nn.Module) -> None:
    """Drop the model's cached copy (it moved to another device or dtype): it would hold memory for nothing."""
    _copies.pop(model, None)


class NonFiniteHalf(ArithmeticError):
    """A half-precision computation turned a finite input into a non-finite output."""


def _raise_if_overflowed(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # A non-finite input gives a non-finite output at any precision: nothing to recompute.
    if y.dtype in HALF_DTYPES and not torch.isfinite(y).all() and torch.isfinite(x).all():
        raise NonFiniteHalf(y.dtype)
    return y


def _unchecked(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y


class Fallbacks:
    """The precision fallbacks of one inference call:

    - no gradient: inference builds no graph (a frozen model under autograd comes here too);
    - half precision that this CPU would emulate computes with the model's fp32 copy (`model` is that copy);
    - a half-precision result, or any stage of a tiled one, that comes out non-finite from a finite input is
      computed again, whole, with the fp32 copy: a stage recomputed alone would hand its result to the next
      in half precision, where values beyond fp16's range become inf.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = fp32_copy(model) if emulated_on_cpu(model.dtype, device) else model
        self._fp32: nn.Module | None = None

    def __call__(self, compute: Callable[[nn.Module, torch.Tensor, Check], torch.Tensor], x: torch.Tensor):
        """`compute(model, x, check)` in the model's dtype, returned in x's; `compute` passes each stage's output
        and input through `check`, which raises NonFiniteHalf where half precision overflowed."""
        check = _raise_if_overflowed if self.model.dtype in HALF_DTYPES else _unchecked
        with torch.no_grad():
            try:
                return compute(self.model, x.to(self.model.dtype), check).to(x.dtype)
            except NonFiniteHalf as overflow:
                if self._fp32 is None:
                    log.warning("%s result was not finite; recomputing in float32 (force_upcast)", overflow.args[0])
                    self._fp32 = fp32_copy(self.model)
                return compute(self._fp32, x.float(), _unchecked).to(x.dtype)
