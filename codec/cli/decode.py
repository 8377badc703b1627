"""`codec decode LATENTS -o DIR`: a latents file from `codec encode` (codec.latents_file) back to PNG images."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from codec import latent_norm
from codec.atomic import atomic_path
from codec.cli.common import add_model_options, check_output_folder, load_model, output_stems
from codec.cli.outputs import add_overwrite_option, check_outputs, recording
from codec.images import tensor_to_pil
from codec.latents_file import LatentsFile, Scaling, file_id, read_latents_file
from codec.model import unscale_latents

MAX_DECODED_PIXELS = 2 * 89_478_485  # twice Pillow's decompression-bomb warning, where it refuses to open one


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("decode", help="a latents file from `codec encode` -> PNG images")
    parser.add_argument("latents", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the PNGs")
    add_overwrite_option(parser)
    add_model_options(parser, default_model="the model the file records (codec encode writes it), else 'builtin'")
    parser.set_defaults(run=run, model=None)


def decoding_model(given: str | None, recorded: str | None, source: Path) -> str:
    """--model if given (with a word where it is not the model that encoded the file), else the recorded one."""
    from codec.weights import check_spec

    if given is not None:
        if recorded is not None and recorded != given:
            print(f"note: {source} was encoded with {recorded}; decoding with {given} as asked")
        return given
    if recorded is None:
        return "builtin"
    try:
        check_spec(recorded)
    except ValueError:
        raise ValueError(f"{source}: encoded with {recorded}, which is not found here; name it with --model") from None
    print(f"decoding with {recorded}, the model that encoded {source}")
    return recorded


def output_targets(args: argparse.Namespace, record: LatentsFile) -> list[Path]:
    """One PNG per latent, refused where it would replace an image the latents were encoded from."""
    targets = [args.output / f"{stem}.png" for stem in output_stems(record.sources)]
    originals = set(record.files or [])
    clobbered = [str(target) for target in targets if target.exists() and file_id(target) in originals]
    if clobbered:  # -o is the folder the images were encoded from
        raise ValueError(f"-o {args.output}: writing there would replace the encoded image(s) {', '.join(clobbered)}")
    check_outputs(targets, args.overwrite, model=args.model)
    return targets


def recorded_norm(args: argparse.Namespace, record: LatentsFile, vae) -> latent_norm.LatentBatchNorm | None:
    """FLUX.2's normalisation as the file records it (the statistics it was encoded with), or None."""
    if (record.latent_norm is None) != (vae.bn is None):
        encoded = "a FLUX.2 codec" if record.latent_norm is not None else "a codec without FLUX.2's batch norm"
        raise ValueError(f"{args.latents}: encoded with {encoded} ({record.model}); pass one of that kind with --model")
    if record.latent_norm is None:
        return None
    try:
        return latent_norm.from_record(record.latent_norm)
    except ValueError as error:
        raise ValueError(f"{args.latents}: its 'latent_norm' metadata is {error}") from None


def decoding_config(args: argparse.Namespace, record: LatentsFile, vae, norm):
    """The model's config with the file's scaling, once the latents are known to fit the model."""
    channels = int(record.latents[0].shape[0])
    wanted = vae.config.latent_channels * (norm.patch_size[0] * norm.patch_size[1] if norm is not None else 1)
    if channels != wanted:
        raise ValueError(
            f"{args.latents}: latents of {channels} channels (encoded with {record.model}), "
            f"but {args.model} decodes {wanted}; pass the model that encoded them with --model"
        )
    theirs = Scaling.of(vae.config)
    if record.scaling != theirs:
        differ = ", ".join(
            f"{name} {value} (the model's config: {getattr(theirs, name)})"
            for name, value in record.scaling.as_config_fields().items()
            if value != getattr(theirs, name)
        )
        print(f"warning: {args.latents} was scaled with {differ}; unscaling with the file's values")
    factor = latent_norm.pixel_multiple(vae.config) if norm is not None else vae.config.downsample_factor
    for latent, (height, width), name in zip(record.latents, record.sizes, record.sources, strict=True):
        full = (latent.shape[-2] * factor, latent.shape[-1] * factor)
        if height > full[0] or width > full[1]:
            raise ValueError(f"{args.latents}: {name} is recorded as {height}x{width}, larger than its latent decodes")
        if full[0] * full[1] > MAX_DECODED_PIXELS:  # as Pillow refuses a decompression bomb
            raise ValueError(f"{args.latents}: {name} would decode to {full[0]}x{full[1]} pixels, over the limit")
    if norm is not None:  # FLUX.2: unscaled by the recorded statistics alone
        return None
    try:
        return dataclasses.replace(vae.config, **record.scaling.as_config_fields())
    except ValueError as error:
        raise ValueError(f"{args.latents}: its scaling does not fit {args.model} ({error})") from None


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    check_output_folder(args.output, "the PNGs")
    record = read_latents_file(args.latents)
    args.model = decoding_model(args.model, record.model, args.latents)
    targets = output_targets(args, record)
    vae = load_model(args)
    norm = recorded_norm(args, record, vae)
    config = decoding_config(args, record, vae, norm)
    args.output.mkdir(parents=True, exist_ok=True)
    with recording(targets):
        for latent, target, (height, width), name in zip(
            record.latents, targets, record.sizes, record.sources, strict=True
        ):
            if norm is not None:  # FLUX.2: the file's statistics undone, then the patches unfolded
                z = norm.denormalize(latent[None].float()).to(vae.device, vae.dtype)
            else:
                z = unscale_latents(latent[None].to(vae.device, vae.dtype), config)
            image = vae.decode(z).sample
            if not torch.isfinite(image).all():  # would be saved as a black image: an error instead
                raise ValueError(f"{args.latents}: {name} decodes to NaN or infinite values; {target} not written")
            with atomic_path(target) as tmp:
                tensor_to_pil(image[..., :height, :width])[0].save(tmp, format="PNG")
            print(f"wrote {target}")
    return 0
