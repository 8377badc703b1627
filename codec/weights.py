"""diffusers-format weights: folders of config.json + diffusion_pytorch_model.safetensors, locally or on the hub."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from codec.atomic import atomic_path
from codec.checkpoint import CheckpointError, LoadedWeights, Provenance, read_tensors
from codec.config import CONFIG_NAME, PRESETS, AutoencoderKLConfig
from codec.keys import upgrade_legacy_attention_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubOptions:
    """What huggingface_hub's downloads take besides the file (None: its environment's defaults)."""

    cache_dir: str | os.PathLike | None = None
    token: str | bool | None = None
    local_files_only: bool = False


WEIGHTS_STEM = "diffusion_pytorch_model"
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")  # .sft: FLUX's ae.sft
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
SHARD_NAME = re.compile(rf"{WEIGHTS_STEM}(\.[\w-]+)?-\d{{5}}-of-\d{{5}}(\.[\w-]+)?\.(safetensors|bin)")


def _weight_names(variant: str | None) -> list[str]:
    infix = f".{variant}" if variant else ""
    # safetensors first: it cannot carry code, and it loads without unpickling.
    return [f"{WEIGHTS_STEM}{infix}.safetensors", f"{WEIGHTS_STEM}{infix}.bin"]


def _variant_index_name(name: str, variant: str | None) -> str:
    """diffusers names a sharded variant's index `<stem>.safetensors.index.<variant>.json`."""
    base = name.replace(f".{variant}", "") if variant else name
    return f"{base}.index.{variant}.json" if variant else f"{base}.index.json"


def _weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: unreadable shard index ({error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: unreadable shard index (weight_map must map names to shard files)")
    return weight_map


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(_weight_map(index_path).values())):
        tensors.update(read_tensors(index_path.parent / shard))
    return tensors


def _loaded(config: AutoencoderKLConfig, tensors: dict[str, torch.Tensor], source: str) -> LoadedWeights:
    return LoadedWeights(config, upgrade_legacy_attention_keys(tensors), Provenance(source))


def read_folder(folder: Path, variant: str | None) -> LoadedWeights:
    if not (folder / CONFIG_NAME).is_file() and (folder / "vae" / CONFIG_NAME).is_file():
        folder = folder / "vae"  # a whole pipeline: its VAE lives in vae/
    config = AutoencoderKLConfig.from_json(folder / CONFIG_NAME)
    for name in _weight_names(variant):
        path = folder / name
        if path.is_file():
            return _loaded(config, read_tensors(path), str(path))
        for index in (folder / f"{name}.index.json", folder / _variant_index_name(name, variant)):
            if index.is_file():
                return _loaded(config, _read_sharded(index), str(index))
    raise CheckpointError(f"{folder}: no weights found; expected one of {', '.join(_weight_names(variant))}")


class _HubFiles:
    """One repository's files at one revision, fetched through huggingface_hub (or found in its cache)."""

    def __init__(self, repo_id: str, revision: str | None, hub: HubOptions | None) -> None:
        self.repo_id, self.revision, self.hub = repo_id, revision, hub or HubOptions()
        self.not_cached: list[Exception] = []

    def fetch(self, filename: str, folder: str | None) -> Path | None:
        """The file, downloaded or from the cache; None where the repository has no such file, or (offline) the
        cache does not hold it."""
        import huggingface_hub
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RevisionNotFoundError,
        )

        try:
            options = dataclasses.asdict(self.hub)
            return Path(
                huggingface_hub.hf_hub_download(
                    self.repo_id, filename, subfolder=folder, revision=self.revision, **options
                )
            )
        # LocalEntryNotFoundError (offline, not cached) subclasses EntryNotFoundError: it must be caught first.
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
            # Offline, a file missing from the cache may be one the repository lacks (a sharded VAE has no single
            # weights file, a pipeline no config.json at its root): the other candidates are tried, and the hub is
            # called unreachable only if none of them is cached.
            self.not_cached.append(error)
            return None
        except EntryNotFoundError:
            return None
        except RevisionNotFoundError:
            raise CheckpointError(f"{self.repo_id}: no revision {self.revision!r} (a branch, tag or commit)") from None
        except (HfHubHTTPError, OSError) as error:
            raise _hub_unreachable(self.repo_id, error) from None

    def missing(self, message: str) -> CheckpointError:
        if self.not_cached:
            return _hub_unreachable(self.repo_id, self.not_cached[-1])
        return CheckpointError(f"{self.repo_id}: {message}")


def read_from_hub(
    repo_id: str,
    subfolder: str | None,
    variant: str | None,
    revision: str | None = None,
    hub: HubOptions | None = None,
) -> LoadedWeights:
    files = _HubFiles(repo_id, revision, hub)
    for folder in [subfolder] if subfolder else [None, "vae"]:  # a VAE repository, or a pipeline's vae/
        config_path = files.fetch(CONFIG_NAME, folder)
        if config_path is None:
            continue
        config = AutoencoderKLConfig.from_json(config_path)
        for name in _weight_names(variant):
            weights = files.fetch(name, folder)
            if weights is not None:
                return _loaded(config, read_tensors(weights), f"{repo_id}/{weights.name}")
            for index_name in dict.fromkeys((f"{name}.index.json", _variant_index_name(name, variant))):
                index = files.fetch(index_name, folder)
                if index is not None:  # sharded: fetch every shard it names into the same snapshot folder
                    for shard in sorted(set(_weight_map(index).values())):
                        if files.fetch(shard, folder) is None:
                            raise files.missing(f"{index_name} names {shard}, which is not there")
                    return _loaded(config, _read_sharded(index), f"{repo_id}/{index.name}")
        where = f"{folder}/" if folder else "the repository root"
        raise files.missing(f"no weights file in {where}; expected one of {', '.join(_weight_names(variant))}")
    raise files.missing(f"no config.json {f'in {subfolder}/' if subfolder else 'at the root or in vae/'}")


def _hub_unreachable(repo_id: str, error: Exception) -> CheckpointError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return CheckpointError(
            f"{repo_id}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set, so the hub was not asked.\n"
            "  It is not a local folder or file either. Download it where there is a network "
            f"(`hf download {repo_id}`) and pass the local folder, or unset HF_HUB_OFFLINE to fetch it."
        )
    return CheckpointError(
        f"{repo_id}: could not fetch it from the Hugging Face hub ({type(error).__name__}: {error}).\n"
        "  It is not a local folder or file either. Offline, download it where there is a network "
        f"(`hf download {repo_id}`), then pass the local folder, or set HF_HUB_OFFLINE=1 to use the cache."
    )


def read_pretrained(
    path_or_hub_id: str | os.PathLike,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    hub: HubOptions | None = None,
) -> LoadedWeights:
    """A diffusers folder (or a pipeline's, whose VAE is in vae/) or a hub id."""
    name = str(path_or_hub_id)
    path = Path(name).expanduser()  # `--model=~/vae`: the shell leaves a ~ after = alone
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return read_folder(path, variant)
    if path.is_file():
        raise CheckpointError(f"{path}: is a file; use AutoencoderKL.from_single_file for single-file checkpoints")
    if isinstance(path_or_hub_id, os.PathLike) or name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name):
        raise CheckpointError(f"{name}: no such folder, and not a hub id of the form owner/name")
    return read_from_hub(name, subfolder, variant, revision, hub)


def write_pretrained(
    directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: AutoencoderKLConfig,
    variant: str | None = None,
) -> None:
    """config.json and the safetensors weights, as diffusers' save_pretrained writes them."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    # Both files are written in full before either replaces its old self: saving over another model, a crash or
    # a full disk while writing leaves the old pair, never a config beside weights it does not describe.
    with atomic_path(directory / CONFIG_NAME) as config_tmp, atomic_path(directory / _weight_names(variant)[0]) as tmp:
        config.to_json(config_tmp)
        save_file(state, str(tmp), metadata={"format": "pt"})
    _remove_stale_shards(directory, variant)


def _remove_stale_shards(directory: Path, variant: str | None) -> None:
    """Sharded weights of an earlier model saved here (with this variant): diffusers would read their index before
    the new file, and load the old model. diffusers' own save_pretrained removes them too. Index first, so that an
    interruption leaves no index naming missing shards."""
    for name in _weight_names(variant):
        for index in dict.fromkeys((directory / f"{name}.index.json", directory / _variant_index_name(name, variant))):
            if not index.is_file():
                continue
            try:
                shards = set(_weight_map(index).values())
            except CheckpointError:
                shards = set()
            index.unlink()
            # Only files named as diffusers names shards (stem-00001-of-00003...): an index is data from elsewhere,
            # and one naming config.json or the weights just written must not delete them.
            shards = [directory / shard for shard in sorted(shards) if SHARD_NAME.fullmatch(shard)]
            for shard in shards:
                if shard.is_file():
                    shard.unlink()
            log.info("%s: removed an earlier model's sharded weights (%d shards)", directory, len(shards))


def check_spec(spec: str | os.PathLike) -> None:
    """Refuse, without loading anything, a --model that codec.loading.read_model could not load for a reason seen
    from here: an unknown preset, or a local path that does not exist (a hub id is only checked for its form).
    Commands that take several models call it for all of them first, so a typo in the last is not found after
    hours of work."""
    text = str(spec)
    if text == "builtin":
        return
    if text.startswith("preset:"):
        if text.split(":", 1)[1] not in PRESETS:
            raise CheckpointError(f"{text}: unknown preset; choose one of {', '.join(PRESETS)}")
        return
    path = Path(text).expanduser()
    if path.exists():
        return
    looks_local = (
        isinstance(spec, os.PathLike)
        or text.startswith((".", "/", "~"))
        or path.suffix.lower() in (SINGLE_FILE_SUFFIXES)
    )
    if looks_local or not HUB_ID.fullmatch(text):
        import difflib

        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(f"{text}: no such file")
        close = difflib.get_close_matches(text, ["builtin", *(f"preset:{name}" for name in PRESETS)], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise CheckpointError(f"{text}: no such folder or file, and not a hub id of the form owner/name{hint}")
