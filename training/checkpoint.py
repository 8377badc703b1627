"""A run's checkpoint on disk: safetensors for tensors, JSON for the rest, so that reading one runs no code.

A checkpoint folder (`checkpoints/step-NNNNNNN`) holds:

- `state.json`: the state of every part (loop position, optimizers, schedule, loss scalers, EMA...) with each
  tensor replaced by a reference into that part's safetensors file, and the byte size of every such file;
- `<part>.safetensors`: the tensors of each part that has any (`model.safetensors`: the autoencoder being
  trained, its keys under `vae.`; `ema.safetensors`: the EMA, its keys under `shadow.`; `optimizer.safetensors`...);
- `rng.rank<N>.json`: the random generators of process N (Python, NumPy, torch, CUDA).

Every process writes its own generators; the main process writes the rest, `state.json` last. The folder is
written under a temporary name and renamed when complete, so a folder with a step name was written whole.
Pickled files (an older layout's, or planted ones) are never read.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codec.atomic import atomic_path, atomic_write_text
from codec.checkpoint import CheckpointError, is_safetensors
from training.state import checkpoint_dir, checkpoint_step, list_checkpoints, prune_checkpoints

STATE = "state.json"
FORMAT = 1
# What an older layout (accelerate's save_state) left: pickles, which are not read here.
PICKLED = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin")
PART_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # also a file name: nothing outside the folder
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"

States = dict[str, dict[str, Any]]


def rng_file(folder: Path, process_index: int) -> Path:
    return folder / f"rng.rank{process_index}.json"


def write_checkpoint(accelerator, output_dir: Path, step: int, states: Callable[[], States], keep: int) -> Path:
    """Write a checkpoint of `step` whole or not at all, then keep the `keep` latest. A collective: every process
    calls it; `states` is called on the main process only."""
    final = checkpoint_dir(output_dir, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():  # left by a run killed while saving
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    save_rng(partial, accelerator.process_index)
    if accelerator.is_main_process:
        save_states(partial, states())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replaced = final.with_name(final.name + ".replaced")
        if final.exists():  # saved again at the same step: moved aside, never deleted before its successor is in
            final.rename(replaced)
        partial.rename(final)
        if replaced.exists():
            shutil.rmtree(replaced)
        prune_checkpoints(output_dir, keep, final)
    accelerator.wait_for_everyone()
    return final


def save_states(folder: Path, states: States) -> None:
    """Each part's tensors to `<part>.safetensors` and everything else to state.json, written last."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    parts, sizes = {}, {}
    for name, state in states.items():
        tensors: dict[str, torch.Tensor] = {}
        parts[name] = _encode(state, "", tensors)
        if tensors:
            path = folder / f"{name}.safetensors"
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
            sizes[path.name] = path.stat().st_size
    atomic_write_text(folder / STATE, json.dumps({"format": FORMAT, "parts": parts, "files": sizes}, indent=1))


def read_states(folder: Path) -> States:
    """Every part's state, its tensors on the CPU. Names the file at fault when any is missing or damaged."""
    record = read_record(folder)
    states = {}
    for name, encoded in record["parts"].items():
        if not PART_NAME.match(name):
            raise CheckpointError(f"{folder / STATE}: {name!r} is not a part name of this trainer")
        path = folder / f"{name}.safetensors"
        tensors = read_safetensors(path) if path.name in record["files"] else {}
        states[name] = _decode(encoded, tensors, f"{folder / STATE} (part {name})")
    return states


def read_record(folder: Path) -> dict:
    """state.json, after checking that every file it lists is there at its recorded size."""
    path = folder / STATE
    if not path.is_file():
        if any((folder / name).is_file() for name in PICKLED):
            raise CheckpointError(
                f"{folder}: a checkpoint in the older, pickled layout, which is not read since a pickle can run "
                f"code; `python -m training.export {folder} OUT` still exports its weights, and model.init=OUT "
                "trains on from them"
            )
        raise CheckpointError(f"{path}: missing, so {folder} is not a complete checkpoint")
    record = read_json(path)
    if record.get("format") != FORMAT or not isinstance(record.get("parts"), dict):
        raise CheckpointError(f"{path}: not a checkpoint record of this trainer (format {FORMAT})")
    files = record.get("files")
    if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
        raise CheckpointError(f"{path}: its file list is damaged")
    for name, size in files.items():
        if Path(name).name != name or not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing from the checkpoint")
        found = (folder / name).stat().st_size
        if found != size:
            raise CheckpointError(f"{folder / name}: {found} bytes where {size} were written: truncated or damaged")
    return record


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None: it is), from its record and file sizes alone."""
    try:
        read_record(folder)
        read_json(rng_file(folder, 0))
    except CheckpointError as error:
        return str(error)
    return None


def previous_complete(folder: Path, output_dir: Path) -> Path | None:
    """The latest complete checkpoint of the run before `folder`."""
    earlier = [c for c in list_checkpoints(output_dir) if checkpoint_step(c) < checkpoint_step(folder)]
    return next((c for c in reversed(earlier) if checkpoint_problem(c) is None), None)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; anything else in its place (a pickle) is refused unread."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    if not is_safetensors(path):
        raise CheckpointError(f"{path}: not a safetensors file (perhaps a pickle, which is never read)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file, perhaps truncated ({error})") from None


def read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file, perhaps damaged or replaced ({error})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(loaded).__name__}")
    return loaded


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, each tensor moved into `tensors` under its path and replaced by a reference to it."""
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two tensors of a checkpoint part share the name {name!r}")
        tensors[name] = value.detach().to("cpu").contiguous()
        return {_TENSOR: name}
    prefix = f"{name}." if name else ""
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _encode(item, prefix + key, tensors) for key, item in value.items()}
        return {_ITEMS: [[key, _encode(item, f"{prefix}{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, f"{prefix}{i}", tensors) for i, item in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{name or 'state'}: a {type(value).__name__} cannot be checkpointed as JSON")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, where) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and _TENSOR in value:
        if value[_TENSOR] not in tensors:
            raise CheckpointError(f"{where}: names a tensor {value[_TENSOR]!r} that its safetensors file lacks")
        return tensors[value[_TENSOR]]
    if len(value) == 1 and _TUPLE in value and isinstance(value[_TUPLE], list):
        return tuple(_decode(item, tensors, where) for item in value[_TUPLE])
    if len(value) == 1 and _ITEMS in value:
        try:
            return {key: _decode(item, tensors, where) for key, item in value[_ITEMS]}
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: a damaged list of entries") from None
    return {key: _decode(item, tensors, where) for key, item in value.items()}


def save_rng(folder: Path, process_index: int) -> None:
    """This process's random generators, as accelerate's save_state kept them."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": _bytes_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_text(s) for s in torch.cuda.get_rng_state_all()]
    atomic_write_text(rng_file(folder, process_index), json.dumps(state))


def restore_rng(folder: Path, process_index: int) -> bool:
    """Restore this process's generators; False when the checkpoint has none for it (fewer processes then)."""
    path = rng_file(folder, process_index)
    if not path.exists():
        return False
    state = read_json(path)
    try:
        version, internal, gauss = state["python"]
        kind, keys, position, has_gauss, cached = state["numpy"]
        python = (version, tuple(internal), gauss)
        numpy = (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached)
        torch_state = _text_bytes(state["torch"])
        cuda = [_text_bytes(s) for s in state.get("cuda", [])]
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(torch_state)
        if torch.cuda.is_available():
            for device, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, binascii.Error) as error:
        raise CheckpointError(f"{path}: not a random-generator state this trainer wrote ({error})") from None
    return True


def _bytes_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _text_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)
