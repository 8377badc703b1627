"""Accelerate for every multi-process command (cache, bench, training), made safe on CPU-only machines.

Two traps, both seen with accelerate 1.15: on a machine without GPUs, an `Accelerator()` made without
`cpu=True` under a multi-process launch runs each process alone (`DistributedType.NO`), silently duplicating
the work; and `accelerate launch --cpu --num_processes 2` starts a single process. So: on a multi-process
launch without CUDA we ask for `cpu=True` (gloo), then check that the process group really has every
launched process, and refuse to run otherwise. `shutdown` tears the group down explicitly, since gloo
processes that exit with the group alive sometimes abort ("terminate called without an active exception").
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


class DistributedSetupError(RuntimeError):
    """Launched with several processes, but they did not form one process group."""


def launched_world_size() -> int:
    """Processes the launcher started (torchrun and accelerate launch set WORLD_SIZE), 1 for a plain run."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def make_accelerator(**kwargs: Any) -> Accelerator:
    """An `accelerate.Accelerator` that forms a real process group whenever the launch had several processes."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    world = launched_world_size()
    if world > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    accelerator = Accelerator(**kwargs)
    if world > 1 and (accelerator.distributed_type == DistributedType.NO or accelerator.num_processes != world):
        raise DistributedSetupError(
            f"launched with {world} processes, but Accelerate formed a group of {accelerator.num_processes} "
            f"({accelerator.distributed_type}); each process would run alone and duplicate the work. "
            "Check `accelerate config` (on CPU-only machines use --multi_gpu with cpu: true, or torchrun)."
        )
    return accelerator


def shutdown(accelerator: Accelerator) -> None:
    """Wait for every process, end trackers, and destroy the process group before the interpreter exits."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
