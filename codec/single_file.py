"""Single-file checkpoints as A1111, ComfyUI and the original LDM code write them.

A VAE file holds bare keys (`encoder.down.0.block.0.conv1.weight`); a whole SD checkpoint holds them under
`first_stage_model.`; some tools prefix `vae.`. The architecture is read off the tensor shapes. The scaling
factor comes, in order, from `config`, from the settings our own files record in their metadata, from a whole
checkpoint's family markers (SDXL's conditioner, SD3's and FLUX's keys, Playground's `edm_*`), or from the family
the shapes suggest, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from codec import latent_norm
from codec.atomic import atomic_path
from codec.checkpoint import CheckpointError, LoadedWeights, Provenance, read_checkpoint
from codec.config import BATCH_NORM_FIELDS, BATCH_NORM_TUPLES, AutoencoderKLConfig, ConfigError, preset
from codec.keys import diffusers_to_ldm, is_ldm_layout, ldm_to_diffusers, upgrade_legacy_attention_keys

log = logging.getLogger(__name__)
PREFIXES = ("first_stage_model.", "vae.", "model.")
# A whole pipeline checkpoint says which model it is by the rest of its keys (as diffusers' single-file loader
# tells them apart): SDXL's and SD 1.x's VAEs have the same shapes but different scaling factors, as have SD3's and
# FLUX's. A bare VAE file carries no such keys, and gets the family its shapes suggest, with a warning.
FAMILY_MARKERS = (
    ("conditioner.embedders.", "sdxl"),  # SDXL base and refiner (both scale by 0.13025)
    ("joint_blocks.", "sd3"),  # SD3 / SD3.5 MMDiT
    ("double_blocks.", "flux"),  # FLUX
    ("cond_stage_model.", "sd"),  # SD 1.x / 2.x
)


# What the shapes cannot tell, recorded in the metadata of the .safetensors files we write (other tools ignore it),
# so that an SDXL or SD3 VAE exported here comes back with its own scaling factor.
METADATA_KEY = "latent_codec_settings"
# The GroupNorm group count is among them: per-channel norm weights do not show it, and a model with 8 groups read
# as 32 runs without error, and badly.
RECORDED_SETTINGS = (
    "norm_num_groups", "act_fn", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "sample_size",
)  # fmt: skip


# Playground v2.5 (a whole SDXL-shaped checkpoint) keeps per-channel latent statistics at the top level.
EDM_KEYS = ("edm_mean", "edm_std")
PLAYGROUND_SCALING_FACTOR = 0.5
# What LDM's training leaves in a VAE file beside the weights: the loss's LPIPS and discriminator, an EMA copy.
LDM_LEFTOVERS = ("loss.", "model_ema.")
SCALING_SETTINGS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def _recorded_settings(metadata: dict[str, str]) -> dict:
    text = metadata.get(METADATA_KEY)
    try:
        settings = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(settings, dict):  # valid JSON of another shape: no record we wrote, so none at all
        return {}
    settings = {name: value for name, value in settings.items() if name in (*RECORDED_SETTINGS, *BATCH_NORM_FIELDS)}
    for name in ("latents_mean", "latents_std", *BATCH_NORM_TUPLES):
        if isinstance(settings.get(name), list):
            settings[name] = tuple(settings[name])
    return settings


def checkpoint_family(keys) -> str | None:
    """The preset whose scaling factors a whole checkpoint's VAE uses, or None for a bare VAE file."""
    keys = list(keys)
    for marker, family in FAMILY_MARKERS:
        if any(marker in key for key in keys):
            return family
    return None


def extract_vae_tensors(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The VAE's tensors with any checkpoint prefix removed, in diffusers' layout."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    tensors = {k: v for k, v in tensors.items() if _is_vae_key(k)}
    if not tensors:
        raise CheckpointError(
            f"{source}: no VAE weights found (no keys starting with encoder./decoder./quant_conv./post_quant_conv.)"
        )
    if is_ldm_layout(tensors):
        return ldm_to_diffusers(tensors)
    return upgrade_legacy_attention_keys(tensors)


def _is_vae_key(key: str) -> bool:
    return key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn."))  # bn.: FLUX.2's


def _may_be_vae_key(key: str) -> bool:
    """Whether a whole checkpoint's tensor may be its VAE's: bare or under one of PREFIXES."""
    return _is_vae_key(key) or any(key.startswith(prefix) and _is_vae_key(key[len(prefix) :]) for prefix in PREFIXES)


def infer_config(
    tensors: dict[str, torch.Tensor],
    source: str,
    family: str | None = None,
    quiet: bool = False,
    recorded: dict | None = None,
) -> AutoencoderKLConfig:
    """Architecture from the shapes of diffusers-layout tensors; scaling and shift from `family` (the checkpoint's,
    see checkpoint_family) or else from the family the shapes suggest; `recorded` settings (a file we wrote) win."""
    if not any(k.startswith("encoder.down_blocks.") for k in tensors):
        raise CheckpointError(
            f"{source}: cannot infer the VAE architecture: no encoder.down_blocks (or LDM encoder.down) weights; "
            "a decoder-only file, or not an SD-style AutoencoderKL (TAESD and other small autoencoders are laid "
            "out otherwise)"
        )
    try:
        levels = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
        channels = tuple(tensors[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
        layers = len({m.group(1) for k in tensors if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
        latent = tensors["decoder.conv_in.weight"].shape[1]
        in_channels = tensors["encoder.conv_in.weight"].shape[1]
        out_channels = tensors["decoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{source}: cannot infer the VAE architecture from its keys (missing {error})") from None
    has_quant = "quant_conv.weight" in tensors
    flux2 = latent_norm.inferred_fields(tensors, channels)  # FLUX.2: batch norm of patches, narrower decoder
    family = _scaling_family(family, latent, source, quiet or bool(flux2))
    fields = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=32,
        sample_size=family.sample_size,
        scaling_factor=family.scaling_factor,
        shift_factor=family.shift_factor,
        use_quant_conv=has_quant,
        use_post_quant_conv="post_quant_conv.weight" in tensors,
        mid_block_add_attention=any(".mid_block.attentions." in k for k in tensors),
    )
    fields.update(flux2)
    try:  # recorded settings before validation: 8 groups of 48 channels are valid, 32 groups are not
        return AutoencoderKLConfig(**{**fields, **(recorded or {})})
    except ConfigError as error:
        raise CheckpointError(f"{source}: inferred an invalid config ({error})") from None


def _scaling_family(family: str | None, latent: int, source: str, quiet: bool) -> AutoencoderKLConfig:
    """The preset whose scaling and shift a VAE with `latent` channels takes: `family`'s where it fits, else the
    one its channel count suggests, with a warning unless `quiet`."""
    known = preset(family) if family is not None else None
    if known is not None and known.latent_channels == latent:
        return known
    guessed = preset("sd") if latent == 4 else preset("flux") if latent == 16 else AutoencoderKLConfig()
    if not quiet:
        guesses = {4: "SD 1.x/2.x; config='sdxl' for SDXL's VAE", 16: "FLUX; config='sd3' for SD3's VAE"}
        log.warning(
            "%s: the file does not record its scaling factor; assuming %s (%s, or a config.json with the right one)",
            source,
            guessed.scaling_factor,
            guesses.get(latent, f"unknown for {latent} channels; pass config= a config.json that has it"),
        )
    return guessed


def resolve_config(config: AutoencoderKLConfig | str | os.PathLike) -> AutoencoderKLConfig:
    if isinstance(config, AutoencoderKLConfig):
        return config
    text = str(config)
    if Path(text).exists():
        return AutoencoderKLConfig.from_json(text)
    return preset(text)


def read_single_file(
    path: str | os.PathLike, config: AutoencoderKLConfig | str | os.PathLike | None = None
) -> LoadedWeights:
    """The VAE of a single file, with `config` (a config, a preset name or a config.json) or the one its shapes
    and recorded settings say."""
    path = Path(path).expanduser()
    source = str(path)
    checkpoint = read_checkpoint(path, keep=lambda name: _may_be_vae_key(name) or name in EDM_KEYS)
    _refuse_other_autoencoders(checkpoint.names, source)
    tensors = extract_vae_tensors(checkpoint.tensors, source)
    if config is not None:
        return LoadedWeights(resolve_config(config), tensors, Provenance(source))
    recorded = _recorded_settings(checkpoint.metadata)
    knows_scaling = "scaling_factor" in recorded
    family = None if knows_scaling else checkpoint_family(checkpoint.names)
    statistics = {} if knows_scaling else _playground_statistics(checkpoint.tensors)
    quiet = knows_scaling or bool(statistics)
    inferred = infer_config(tensors, source, family, quiet=quiet, recorded={**recorded, **statistics})
    if family is None and not any(
        _is_vae_key(name[len(p) :]) for name in checkpoint.names for p in PREFIXES if name.startswith(p)
    ):
        _warn_about_ignored_tensors(checkpoint.names, source)  # a bare VAE file: its other tensors are odd
    # A guess, said once by infer_config; write_single_file leaves it out of what the file records, so that it is
    # not read back as the truth.
    guessed = family is None and not quiet
    return LoadedWeights(inferred, tensors, Provenance(source, scaling_is_guess=guessed))


def _playground_statistics(tensors: dict[str, torch.Tensor]) -> dict:
    """Playground v2.5's whole checkpoints carry per-channel latent statistics beside an SDXL-shaped VAE; diffusers
    reads them as latents_mean/std with scaling factor 0.5, as its pipeline was trained."""
    if not all(name in tensors for name in EDM_KEYS):
        return {}
    mean, std = (tuple(tensors[name].float().flatten().tolist()) for name in EDM_KEYS)
    return {"scaling_factor": PLAYGROUND_SCALING_FACTOR, "latents_mean": mean, "latents_std": std}


def _refuse_other_autoencoders(names: list[str], source: str) -> None:
    codebooks = {prefix + "quantize.embedding.weight" for prefix in ("", *PREFIXES)}
    if codebooks & set(names):
        raise CheckpointError(
            f"{source}: a vector-quantised autoencoder (VQModel: it has a quantize.embedding codebook), not a "
            "KL-regularised AutoencoderKL"
        )


def _warn_about_ignored_tensors(names: list[str], source: str) -> None:
    """A bare VAE file whose other tensors are neither the VAE's nor known leftovers of LDM training: they may carry
    what the model needs, so say that they were left out."""
    ignored = [n for n in names if not _may_be_vae_key(n) and n not in EDM_KEYS and not n.startswith(LDM_LEFTOVERS)]
    if ignored:
        shown = ", ".join(ignored[:4]) + (f", ... ({len(ignored) - 4} more)" if len(ignored) > 4 else "")
        log.warning("%s: ignored %d tensors that are not the VAE's: %s", source, len(ignored), shown)


def write_single_file(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: AutoencoderKLConfig,
    scaling_is_guess: bool = False,
) -> None:
    """Bare LDM keys, as the VAE files A1111 and ComfyUI load; `.safetensors`, or `.ckpt` with a state_dict. A
    guessed scaling factor (`scaling_is_guess`) is left out of the settings the file records."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    state = diffusers_to_ldm(state, len(config.block_out_channels))
    guessed = SCALING_SETTINGS if scaling_is_guess else ()
    settings = {name: getattr(config, name) for name in RECORDED_SETTINGS if name not in guessed}
    settings.update((name, getattr(config, name)) for name in BATCH_NORM_FIELDS if getattr(config, name))
    settings = json.dumps(settings)
    if config.norm_num_groups != 32:
        log.warning(
            "%s: this model normalises in %d groups; the file records it for this package, but A1111, ComfyUI and "
            "diffusers' from_single_file assume 32 unless given its config.json",
            path,
            config.norm_num_groups,
        )
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt", METADATA_KEY: settings})
        elif path.suffix.lower() in (".ckpt", ".pt", ".pth"):
            torch.save({"state_dict": state, METADATA_KEY: settings}, str(tmp))
        else:
            raise CheckpointError(f"{path}: unknown single-file format; use .safetensors, .ckpt, .pt or .pth")
