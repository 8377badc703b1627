"""Which precision a model actually computes in on a CPU, and the fp32 copy used where half would be emulated
(and to recompute a half-precision result that overflowed, codec.inference).

torch runs bf16 and fp16 convolutions on a CPU through emulation unless the CPU has the instructions for them
(AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16). Emulated, an SD decode at 256x256 took 46 s in bf16 and 41 s in
fp16 against 4.6 s in fp32 (AMD EPYC, AVX2 only, 2 threads). So inference with half-precision weights on such a
CPU computes with an fp32 copy of the model and returns its result in the model's dtype: ten times faster, and
more accurate. The copy is made once per model, and its weights refreshed at each use.
"""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch import nn

log = logging.getLogger(__name__)

_copies: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


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
    # The original's plain settings as they are now (tiling, slicing, memory budget, compile mode, ...), derived
    # rather than listed so that a new setting cannot be forgotten here; `training` is nn.Module's own, per module.
    for name, value in vars(model).items():
        plain = isinstance(value, (bool, int, float, str, type(None)))
        if plain and not name.startswith("_") and name != "training":
            setattr(replica, name, value)
    return replica


def forget_fp32_copy(model: nn.Module) -> None:
    """Drop the model's cached copy (it moved to another device or dtype): it would hold memory for nothing."""
    _copies.pop(model, None)
