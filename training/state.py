"""What a run keeps besides the weights: the EMA of the weights, the loop position, and checkpoint folders."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


class EMA:
    """Exponential moving average of the trainable parameters, in fp32, for validation and export.

    Only parameters that train are averaged; frozen ones (the encoder in decoder-only mode) are copied as they
    are when the average is applied. Saved in checkpoints as `ema.safetensors` (keys under `shadow.`).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """The decay ramps up as (1 + n) / (10 + n) towards `decay`: with 0.999 from the start, the average would
        still be mostly the random initial weights after hundreds of steps."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        pairs = [(name, param) for name, param in model.named_parameters() if name in self.shadow]
        for name, param in pairs:
            # The average lives where the model does: it was built (or loaded) before prepare() moved the model
            # to its GPU, and a lerp across devices fails.
            if self.shadow[name].device != param.device:
                self.shadow[name] = self.shadow[name].to(param.device)
        shadows, params = [self.shadow[name] for name, _ in pairs], [param.detach().float() for _, param in pairs]
        torch._foreach_lerp_(shadows, params, weight)  # one launch for all tensors, not one per tensor on a GPU
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        # The decay stays as configured: a resumed run may change optimizer.ema_decay, like any other setting.
        shadow = state["shadow"]
        if not isinstance(shadow, dict) or shadow.keys() != self.shadow.keys():
            raise ValueError("its averaged weights are not this model's trainable ones")
        for name, tensor in shadow.items():
            if not isinstance(tensor, torch.Tensor) or tensor.shape != self.shadow[name].shape:
                raise ValueError(f"its average of {name} does not have the weight's shape")
        self.updates = int(state.get("updates", 0))
        self.shadow = {name: tensor.float() for name, tensor in shadow.items()}


class LoopState:
    """Where the loop is: optimizer steps done, epoch, batches consumed in that epoch, images skipped."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.skipped_images = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key not in vars(self) or isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}: {value!r} is not a position of the loop")
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; a folder still being written has another name until it is renamed."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


class CheckpointConflict(ValueError):
    """Checkpoints in the output folder that this run would mix with its own."""


def resolve_resume(resume: bool | str, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: the latest in output_dir for `True`, a given folder for a string.

    Refuses what would mix two runs in one folder, where rotation keeps the highest step numbers and `--resume`
    takes the highest: a fresh run over an earlier run's checkpoints, or a resume from a checkpoint of this folder
    that later ones follow (they belong to the run being abandoned)."""
    existing = list_checkpoints(output_dir)
    if resume is False:
        if existing:
            raise CheckpointConflict(
                f"{output_dir} already holds checkpoints of a run (latest {existing[-1].name}): resume it with "
                "--resume (run.resume=true), or set another run.output_dir"
            )
        return None
    if resume is True:
        return existing[-1] if existing else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointConflict(f"{path}: no such checkpoint folder to resume from")
    later = (
        [c for c in existing if checkpoint_step(c) > checkpoint_step(path)]
        if path.parent.resolve() == (output_dir / "checkpoints").resolve()
        else []
    )
    if later:
        raise CheckpointConflict(
            f"{path}: later checkpoints of the same folder follow it ({', '.join(c.name for c in later)}); they would "
            "outrank this run's own. Move them elsewhere first, or resume into another run.output_dir"
        )
    return path


def checkpoint_step(checkpoint: Path) -> int:
    """The step in a checkpoint folder's name; -1 for another name."""
    match = CHECKPOINT_PATTERN.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def prune_checkpoints(output_dir: Path, keep: int, current: Path) -> None:
    """Keep the `keep` latest checkpoints up to `current` (just written, so never removed); nothing above it."""
    older = [c for c in list_checkpoints(output_dir) if checkpoint_step(c) < checkpoint_step(current)]
    for old in older[: max(0, len(older) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


class RunningMeans:
    """Means of the logged values since the last log step, over the micro-batches of every process.

    Values stay detached tensors on the device until `read`: a float() per step would make the CPU wait for the
    GPU every step. Every process must call `add` for every micro-batch and `read` at the same steps (it is a
    collective); a micro-batch added with weight 0 (a blank stand-in for unreadable images) counts for nothing.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, float] = {}

    def add(self, values: dict[str, torch.Tensor | float], weight: float = 1.0) -> None:
        # Python numbers join the tensors on their device (a fill there, not a copy from the host), so that a sum
        # started from a float (a discriminator's zeros before it starts) does not pull later tensors to the CPU.
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float() * weight
            else:
                value = torch.full((), float(value) * weight, device=device)
            self._sums[name] = self._sums[name] + value.to(self._sums[name].device) if name in self._sums else value
            self._counts[name] = self._counts.get(name, 0.0) + weight

    def read(self, accelerator) -> dict[str, float]:
        """The means since the last read, over every process's micro-batches; then starts afresh."""
        if not self._sums:
            return {}
        names = sorted(self._sums)
        sums = torch.stack([self._sums[n].to(accelerator.device) for n in names])
        counts = torch.tensor([self._counts[n] for n in names], device=accelerator.device)
        if accelerator.num_processes > 1:  # sums and counts apart: a process with fewer real batches weighs less
            sums, counts = accelerator.reduce(torch.stack([sums, counts]), reduction="sum")
        means = sums / counts.clamp_min(1.0)
        self._sums, self._counts = {}, {}
        return dict(zip(names, means.tolist(), strict=True))
