"""What a checkpoint holds of a trainer: the state of each of its parts, and putting it back on resume.

A part the checkpoint lacks but this run has (a discriminator or an EMA added on resume, fp16 after bf16) starts
as a new run's would; a part it holds that this run does not use is left alone. Every value read is checked
against the live object's before it is loaded, so a damaged or tampered state.json is named, not a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from codec.checkpoint import CheckpointError, load_checked
from training.checkpoint import STATE, States, previous_complete, read_states, restore_rng
from training.state import EMA

if TYPE_CHECKING:
    from training.setup import Trainer

log = logging.getLogger("training")

REQUIRED = ("loop", "model", "optimizer", "scheduler")


def states_of(trainer: Trainer) -> States:
    """The state of every part of the trainer, as a checkpoint holds it."""
    accelerator = trainer.accelerator
    states: States = {
        "loop": trainer.state.state_dict(),
        "accelerator": {"step": accelerator.step},  # its micro-batch count, which places the accumulation
        "model": accelerator.unwrap_model(trainer.model).state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
    }
    if accelerator.scaler is not None:
        states["scaler"] = accelerator.scaler.state_dict()
    if trainer.ema is not None:
        states["ema"] = trainer.ema.state_dict()
    if trainer.discriminator is not None:
        states["discriminator"] = accelerator.unwrap_model(trainer.discriminator).state_dict()
        states["disc_optimizer"] = trainer.disc_optimizer.state_dict()
        if trainer.disc_step.scaler is not None:
            states["disc_scaler"] = trainer.disc_step.scaler.state_dict()
    return states


def resume(trainer: Trainer, folder: Path) -> None:
    """Load the checkpoint in `folder` into every part of the trainer, then this process's random generators.
    A damaged checkpoint is named, with the latest complete one before it."""
    try:
        states = read_states(folder)
        missing = [name for name in REQUIRED if name not in states]
        if missing:
            raise CheckpointError(f"{folder / STATE}: holds no {' or '.join(missing)} state")
        _load_parts(trainer, states, folder)
        _apply_configured_rates(trainer)
        if not restore_rng(folder, trainer.accelerator.process_index):
            log.warning("%s holds no random state for process %d: it starts from the seed", folder,
                        trainer.accelerator.process_index)  # fmt: skip
    except CheckpointError as error:
        raise CheckpointError(f"{error}{_earlier_checkpoint_hint(folder, trainer.output_dir)}") from None


def _earlier_checkpoint_hint(folder: Path, output_dir: Path) -> str:
    earlier = previous_complete(folder, output_dir)
    if earlier is None:
        return ""
    if folder.parent.resolve() == (output_dir / "checkpoints").resolve():
        return (
            f". The checkpoint before it, {earlier.name}, is complete: move {folder} out of {folder.parent} "
            "(or rename it) and resume again to continue from there"
        )
    return f". The checkpoint before it is complete: run.resume={earlier}"


def _load_parts(trainer: Trainer, states: States, folder: Path) -> None:
    loaders = _loaders(trainer, folder)
    for name, load in loaders.items():
        if name not in states:
            _start_afresh(trainer, name)
            continue
        try:
            load(states[name])
        except CheckpointError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{folder / STATE}: its {name} state does not fit this run ({reason})") from None
    unused = sorted(set(states) - set(loaders))
    if unused:
        log.info("resuming: %s in %s are not used by this run", ", ".join(unused), folder)


def _loaders(trainer: Trainer, folder: Path) -> dict[str, Callable[[Any], None]]:
    """How each part this run has takes its state, in loading order."""
    accelerator = trainer.accelerator
    loaders: dict[str, Callable[[Any], None]] = {
        "model": lambda s: load_checked(accelerator.unwrap_model(trainer.model), s, str(folder / "model.safetensors")),
        "optimizer": lambda s: _load_optimizer(trainer.optimizer, s, "optimizer"),
        "scheduler": lambda s: trainer.scheduler.load_state_dict(_configured_schedule(s, trainer)),
        "loop": trainer.state.load_state_dict,
        "accelerator": lambda s: setattr(accelerator, "step", int(_like(s, {"step": 0}, "accelerator")["step"])),
    }
    if accelerator.scaler is not None:
        loaders["scaler"] = lambda s: _load_like(accelerator.scaler, s, "scaler")
    if trainer.ema is not None:
        loaders["ema"] = trainer.ema.load_state_dict
    if trainer.discriminator is not None:
        discriminator = accelerator.unwrap_model(trainer.discriminator)
        loaders["discriminator"] = lambda s: load_checked(discriminator, s, str(folder / "discriminator.safetensors"))
        loaders["disc_optimizer"] = lambda s: _load_optimizer(trainer.disc_optimizer, s, "disc_optimizer")
        if trainer.disc_step.scaler is not None:
            loaders["disc_scaler"] = lambda s: _load_like(trainer.disc_step.scaler, s, "disc_scaler")
    return loaders


def _start_afresh(trainer: Trainer, name: str) -> None:
    if name == "disc_scaler":  # a checkpoint of a bf16 run: the discriminator's scale starts at the shared one
        trainer.disc_step.scaler.load_state_dict(trainer.accelerator.scaler.state_dict())
    elif name == "ema":  # averaging from here: the resumed weights, not the run's initial ones
        trainer.ema = EMA(trainer.vae, trainer.ema.decay)
    if name != "accelerator":
        log.warning("resuming: the checkpoint holds no %s state, so it starts afresh", name)


def _configured_schedule(state: dict, trainer: Trainer) -> dict:
    """The saved schedule's position with the configured learning rate: a resumed run uses the configured one
    (the schedule's shape comes from the config already, the lambda not being saved)."""
    state = _like(state, trainer.scheduler.state_dict(), "scheduler")
    factor = trainer.scheduler.scheduler.lr_lambdas[0]
    state["base_lrs"] = [trainer.lr] * len(state["base_lrs"])
    state["_last_lr"] = [trainer.lr * factor(state["last_epoch"])] * len(state["base_lrs"])
    return state


def _apply_configured_rates(trainer: Trainer) -> None:
    """The optimizers' groups at the configured rates, where the loaded schedule stands."""
    for group, rate in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr(), strict=True):
        group["initial_lr"], group["lr"] = trainer.lr, rate
    if trainer.disc_optimizer is not None:
        for group in trainer.disc_optimizer.param_groups:
            group["lr"] = trainer.disc_lr


def _load_optimizer(optimizer, state: dict, name: str) -> None:
    """Check the saved groups' settings and the moments' shapes against the optimizer's, then load them."""
    live = optimizer.state_dict()
    if not isinstance(state.get("param_groups"), list) or len(state["param_groups"]) != len(live["param_groups"]):
        raise ValueError("its parameter groups differ from this run's")
    for saved, group in zip(state["param_groups"], live["param_groups"], strict=True):
        _like({k: v for k, v in saved.items() if k != "params"}, group, name)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, moments in state.get("state", {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(moments, dict):
            raise ValueError(f"a state for parameter {index!r}, which this run does not have")
        for key, value in moments.items():
            if not hasattr(value, "shape") or (value.dim() and value.shape != params[index].shape):
                raise ValueError(f"{key} of parameter {index} does not match its shape")
    optimizer.load_state_dict(state)
    _match_layouts(optimizer)


def _match_layouts(optimizer) -> None:
    """Moments come back contiguous; give each its parameter's memory layout (channels-last on a CPU), as the
    optimizer made them."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for key, value in list(moments.items()):
                if hasattr(value, "shape") and value.shape == param.shape and value.stride() != param.stride():
                    moments[key] = torch.empty_like(param, dtype=value.dtype, device=value.device).copy_(value)


def _load_like(target, state: dict, name: str) -> None:
    target.load_state_dict(_like(state, target.state_dict(), name))


def _like(saved: Any, live: dict, name: str) -> dict:
    """`saved`, checked to hold only the live state's entries, each of the same kind (numbers alike)."""
    if not isinstance(saved, dict):
        raise ValueError(f"expected a mapping, found {type(saved).__name__}")
    for key, value in saved.items():
        if key not in live:
            raise ValueError(f"an entry {key!r} that {name} does not have")
        if not _same_kind(value, live[key]):
            raise ValueError(f"{key!r} is a {type(value).__name__}, not a {type(live[key]).__name__}")
    return dict(saved)


def _same_kind(value: Any, expected: Any) -> bool:
    if expected is None:  # an unset option (foreach, fused): any setting
        return True
    if isinstance(value, bool) or isinstance(expected, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(value, (int, float)) and isinstance(expected, (int, float)):
        return True
    return isinstance(value, type(expected))
