"""`codec encode IMAGES -o latents.safetensors` and `codec decode LATENTS -o DIR`.

The latents file holds one tensor per image (`latent.0`, `latent.1`, ...), scaled as a diffusion model sees
them, and in its metadata the scaling, shift and per-channel statistics used, each source's name and original
size, and the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from codec import latent_norm
from codec.atomic import atomic_path
from codec.cli.common import add_model_options, check_output_folder, load_model, output_stems
from codec.images import image_to_tensor, tensor_to_pil
from codec.model import unscale_latents

SCALING_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
MAX_DECODED_PIXELS = 2 * 89_478_485  # twice Pillow's decompression-bomb warning, where it refuses to open one


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("encode", help="images -> scaled latents in one .safetensors file")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="latents .safetensors file to write")
    parser.add_argument("--sample", action="store_true", help="sample the posterior instead of taking its mean")
    parser.add_argument("--seed", type=int, default=None, help="seed for --sample (default 0)")
    add_model_options(parser)
    parser.set_defaults(run=run_encode)

    parser = subparsers.add_parser("decode", help="a latents file from `codec encode` -> PNG images")
    parser.add_argument("latents", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the PNGs")
    add_model_options(parser, default_model="the model the file records (codec encode writes it), else 'builtin'")
    parser.set_defaults(run=run_decode, model=None)


@torch.no_grad()
def run_encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    # Before any work: a bad path late in a long list, or an output that cannot be written, would waste it all.
    if args.output.is_dir():
        raise ValueError(f"{args.output}: is a folder; -o takes the .safetensors file to write")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:  # what torch's generators take
        raise ValueError(f"--seed must be from -2**63 to 2**64 - 1, got {args.seed}")
    if args.seed is not None and not args.sample:
        raise ValueError("--seed seeds --sample; without it the posterior's mean is taken and there is nothing to seed")
    if args.output.suffix.lower() != ".safetensors":
        raise ValueError(f"{args.output}: latents are written as safetensors; name the file -o NAME.safetensors")
    unusable = [
        f"{path} ({'a folder' if path.is_dir() else 'no such file'})" for path in args.images if not path.is_file()
    ]
    if unusable:
        more = f" and {len(unusable) - 5} more" if len(unusable) > 5 else ""
        raise ValueError(f"cannot read {len(unusable)} input(s): {', '.join(unusable[:5])}{more}")
    vae = load_model(args)
    generator = torch.Generator().manual_seed(args.seed or 0)
    tensors, sources, sizes = {}, [], []
    for index, path in enumerate(tqdm(args.images, desc="encode", unit="img", disable=len(args.images) < 2)):
        x = image_to_tensor(path)
        latents = vae.encode_latents(x, sample=args.sample, generator=generator)
        tensors[f"latent.{index}"] = latents[0].float().cpu().contiguous()
        sources.append(path.name)
        sizes.append(list(x.shape[-2:]))
    metadata = {
        "format": "pt",
        "scaling_factor": repr(vae.config.scaling_factor),
        "shift_factor": repr(vae.config.shift_factor or 0.0),
        "latents_mean": json.dumps(vae.config.latents_mean),  # null, or the per-channel statistics it scaled with
        "latents_std": json.dumps(vae.config.latents_std),
        "sources": json.dumps(sources),
        # Which files the images were, by device and inode rather than by path (no user or folder names in a
        # file that may be shared; links, bind mounts and case-insensitive names still match): decode refuses
        # to write over one.
        "files": json.dumps([_file_id(path) for path in args.images]),
        "sizes": json.dumps(sizes),
        "model": _recorded_model(args.model),
        "posterior": "sample" if args.sample else "mean",
    }
    if vae.bn is not None:  # FLUX.2: its latents are patched and batch-normalised by these statistics
        metadata["latent_norm"] = json.dumps(vae.bn.record())
    with atomic_path(args.output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    print(f"wrote {len(tensors)} latents to {args.output}")
    return 0


def _file_id(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return (stat.st_dev, stat.st_ino)


def _recorded_model(spec: str) -> str:
    """A local model by its absolute path, so `codec decode` finds it from another folder; other specs as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def read_latents_file(path: Path) -> tuple[list[torch.Tensor], dict]:
    from safetensors import safe_open

    from codec.checkpoint import is_safetensors, read_tensors

    if path.is_file() and not is_safetensors(path):
        raise ValueError(f"{path}: not a latents file written by `codec encode` (not a safetensors file)")
    tensors = read_tensors(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    try:
        count = len(tensors)
        latents = [tensors[f"latent.{i}"] for i in range(count)]
        info = {
            "scaling_factor": float(metadata["scaling_factor"]),
            "shift_factor": float(metadata["shift_factor"]),
            "latents_mean": _optional_tuple(metadata.get("latents_mean")),  # files of 0.2.0 and before lack them
            "latents_std": _optional_tuple(metadata.get("latents_std")),
            "sources": json.loads(metadata["sources"]),
            "files": [tuple(f) for f in json.loads(metadata.get("files", "[]"))],  # 0.2.x files lack them
            "sizes": json.loads(metadata["sizes"]),
            "model": metadata.get("model"),
            "latent_norm": json.loads(metadata["latent_norm"]) if "latent_norm" in metadata else None,
        }
    except KeyError as error:
        raise ValueError(f"{path}: not a latents file written by `codec encode` (missing {error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: not a latents file written by `codec encode` ({error})") from None
    _check_latents_record(path, latents, info)
    return latents, info


def _check_latents_record(path: Path, latents: list[torch.Tensor], info: dict) -> None:
    """The metadata must describe the tensors: a file edited or written by another tool fails here, by name."""
    sources, sizes = info["sources"], info["sizes"]
    if not latents:
        raise ValueError(f"{path}: holds no latents")
    if not isinstance(sources, list) or len(sources) != len(latents) or not all(isinstance(s, str) for s in sources):
        raise ValueError(f"{path}: its 'sources' metadata is not one file name per latent ({len(latents)})")
    if not isinstance(sizes, list) or len(sizes) != len(latents):
        raise ValueError(f"{path}: its 'sizes' metadata is not one [height, width] per latent ({len(latents)})")
    for index, (latent, size) in enumerate(zip(latents, sizes, strict=True)):
        whole = isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)
        if latent.dim() != 3 or not latent.is_floating_point() or min(latent.shape) < 1 or not whole:
            raise ValueError(
                f"{path}: latent.{index} is not a (channels, height, width) latent with its image size "
                f"(shape {tuple(latent.shape)}, size {size!r})"
            )
        if not torch.isfinite(latent).all():
            raise ValueError(f"{path}: latent.{index} holds NaN or infinite values")


def _recorded_norm(path: Path, info: dict, vae):
    """FLUX.2's normalisation as the file records it (the statistics it was encoded with), or None."""
    record = info["latent_norm"]
    if (record is None) != (vae.bn is None):
        encoded = "a FLUX.2 codec" if record is not None else "a codec without FLUX.2's batch norm"
        raise ValueError(
            f"{path}: encoded with {encoded} ({info['model']}); pass a model of the same kind with --model"
        )
    if record is None:
        return None
    try:
        return latent_norm.from_record(record)
    except ValueError as error:
        raise ValueError(f"{path}: its 'latent_norm' metadata is {error}") from None


def _optional_tuple(text: str | None) -> tuple[float, ...] | None:
    value = json.loads(text) if text else None
    return tuple(float(v) for v in value) if value is not None else None


def _decoding_model(given: str | None, recorded: str | None, source: Path) -> str:
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


@torch.no_grad()
def run_decode(args: argparse.Namespace) -> int:
    check_output_folder(args.output, "the PNGs")
    latents, info = read_latents_file(args.latents)
    args.model = _decoding_model(args.model, info["model"], args.latents)
    vae = load_model(args)
    norm = _recorded_norm(args.latents, info, vae)
    channels = sorted({int(latent.shape[0]) for latent in latents})
    wanted = vae.config.latent_channels * (norm.patch_size[0] * norm.patch_size[1] if norm is not None else 1)
    if channels != [wanted]:
        raise ValueError(
            f"{args.latents}: latents of {'/'.join(map(str, channels))} channels (encoded with {info['model']}), "
            f"but {args.model} decodes {wanted}; pass the model that encoded them with --model"
        )
    scaling = {name: info[name] for name in SCALING_FIELDS}
    theirs = {name: getattr(vae.config, name) for name in SCALING_FIELDS}
    theirs["shift_factor"] = theirs["shift_factor"] or 0.0
    if scaling != theirs:
        differ = ", ".join(
            f"{name} {scaling[name]} (the model's config: {theirs[name]})"
            for name in SCALING_FIELDS
            if scaling[name] != theirs[name]
        )
        print(f"warning: {args.latents} was scaled with {differ}; unscaling with the file's values")
    recorded = dataclasses.replace(vae.config, **scaling) if norm is None else None  # FLUX.2: by its statistics
    factor = latent_norm.pixel_multiple(vae.config) if norm is not None else vae.config.downsample_factor
    for latent, (height, width), name in zip(latents, info["sizes"], info["sources"], strict=True):
        full = (latent.shape[-2] * factor, latent.shape[-1] * factor)
        if height > full[0] or width > full[1]:
            raise ValueError(f"{args.latents}: {name} is recorded as {height}x{width}, larger than its latent decodes")
        if full[0] * full[1] > MAX_DECODED_PIXELS:  # as Pillow refuses a decompression bomb
            raise ValueError(f"{args.latents}: {name} would decode to {full[0]}x{full[1]} pixels, over the limit")
    stems = output_stems(info["sources"])
    originals = set(info["files"])
    targets = [args.output / f"{stem}.png" for stem in stems]
    clobbered = [str(target) for target in targets if target.exists() and _file_id(target) in originals]
    if clobbered:  # -o is the folder the images were encoded from
        raise ValueError(f"-o {args.output}: writing there would replace the encoded image(s) {', '.join(clobbered)}")
    args.output.mkdir(parents=True, exist_ok=True)
    for latent, stem, (height, width) in zip(latents, stems, info["sizes"], strict=True):
        if norm is not None:  # FLUX.2: the file's statistics undone, then the patches unfolded
            z = norm.denormalize(latent[None].float()).to(vae.device, vae.dtype)
        else:
            z = unscale_latents(latent[None].to(vae.device, vae.dtype), recorded)
        image = vae.decode(z).sample[..., :height, :width]
        target = args.output / f"{stem}.png"
        with atomic_path(target) as tmp:
            tensor_to_pil(image)[0].save(tmp, format="PNG")
        print(f"wrote {target}")
    return 0
