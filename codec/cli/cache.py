"""`codec cache SRC -o OUT`, `codec cache verify OUT` and `codec stats SRC`: latent caches for diffusion training.

`cache verify` is a subcommand of its own, reached by its two words; a source folder that happens to be called
"verify" is `codec cache ./verify -o OUT`. Under `accelerate launch` (or torchrun) the processes split the shards;
see codec.cache.writer.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from codec.cache.preprocess import DEFAULT_BUCKET_STEP, DEFAULT_MAX_ASPECT, RESAMPLE_FILTERS
from codec.cli.common import DTYPES, add_model_options, resolve_device

VERIFY = "cache verify"
CACHE_USAGE = "codec cache SRC -o OUT [options]\n       codec cache verify OUT [--model M]"


def route_cache_verify(argv: list[str]) -> list[str]:
    """`codec cache verify ...` -> the `cache verify` subcommand; every other command line as it is."""
    return [VERIFY, *argv[2:]] if [str(word) for word in argv[:2]] == ["cache", "verify"] else argv


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _add_encoding_options(parser: argparse.ArgumentParser, default_model: str) -> None:
    group = parser.add_argument_group("source")
    group.add_argument("--split", default="train", help="dataset split (default train)")
    group.add_argument("--image-column", default="image", help="dataset column holding the images (default image)")
    group = parser.add_argument_group("preprocessing")
    group.add_argument("--resolution", type=int, default=512, help="square side, or bucket area side (default 512)")
    group.add_argument(
        "--buckets", action="store_true", help="aspect-ratio buckets of about R*R pixels instead of R x R crops"
    )
    group.add_argument(
        "--bucket-step",
        type=int,
        default=None,
        help="with --buckets: bucket sides are multiples of this (default 64)",
    )
    group.add_argument(
        "--max-aspect",
        type=float,
        default=None,
        help="with --buckets: most elongated bucket allowed (default 4)",
    )
    group.add_argument(
        "--resample", choices=sorted(RESAMPLE_FILTERS), default="bicubic", help="resize filter (default bicubic)"
    )
    group.add_argument(
        "--max-pixels", type=int, default=None, help="skip larger images undecoded (default PIL's bomb limit)"
    )
    group = parser.add_argument_group("run")
    group.add_argument("--batch-size", type=int, default=16, help="images per encode (default 16)")
    group.add_argument(
        "--num-workers", type=int, default=min(4, _cpus()), help="image decoding processes (default min(4, CPUs))"
    )
    group.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder (compiles once per bucket shape: slow start)"
    )
    add_model_options(parser, default_model=default_model)
    parser.set_defaults(model=None)  # None: 'builtin' to encode; stats on a cache loads no model


def add_parsers(subparsers) -> None:
    _add_cache_parser(subparsers)
    _add_verify_parser(subparsers)
    _add_stats_parser(subparsers)


def _add_cache_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="encode an image dataset to latents (Parquet shards) for diffusion training",
        usage=CACHE_USAGE,
        description="Encode images to latents, resumably: run the same command again to finish an interrupted run. "
        "SRC: an image folder (recursive), a .txt list of images, a .parquet file or folder, a save_to_disk "
        "folder, or a hub dataset name; or input shards, encoded shard by shard (adding shards encodes only "
        "theirs): WebDataset .tar or .parquet files as a brace pattern ('data/{00000..00999}.tar'), a glob "
        "('data/*.parquet') or a folder of tars, local or an fsspec URL (s3://, gs://, hf://). "
        "`codec cache verify OUT` checks a cache (see `codec cache verify --help`).",
    )
    parser.add_argument("source", metavar="SRC", help="what to encode (a folder named verify: ./verify)")
    parser.add_argument(
        "-o", "--output", type=_output, required=True, help="cache folder to write (or resume): a path or fsspec URL"
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="SRC is a `datasets` name (or folder) to stream, one data file at a time",
    )
    parser.add_argument(
        "--columns",
        help="comma-separated columns to carry (default: a dataset's all but the image, a folder's captions); "
        "'none' for none",
    )
    parser.add_argument("--flip", action="store_true", help="also encode each image mirrored (for flip augmentation)")
    parser.add_argument(
        "--latent-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="storage (default fp16)"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard, on average (default 1000)")
    _add_encoding_options(parser, default_model="none, required (`--model builtin` names the embedded one)")
    _add_engine_options(parser)
    parser.set_defaults(run=run_cache)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (input shards only)")
    group.add_argument(
        "--engine",
        choices=("default", "ray"),
        default="default",
        help="default: this process (or the processes of accelerate launch); ray: a Ray Data pipeline, here or on a "
        "cluster (pip install 'latent-codec[ray]'). Either finishes a cache the other began",
    )
    group.add_argument(
        "--address",
        help="with --engine ray: join this running Ray cluster ('auto': the one this machine is in); default: "
        "start Ray on this machine",
    )
    group.add_argument(
        "--gpus-per-encoder",
        type=float,
        default=None,
        help="with --engine ray: GPUs of each encoder actor (default 1 where the cluster has GPUs, else 0: CPU)",
    )
    group.add_argument(
        "--encoders",
        type=int,
        default=None,
        help="with --engine ray: encoder actors (default: one per encoder's GPUs; 1 on CPU)",
    )
    group.add_argument(
        "--decoders",
        type=int,
        default=None,
        help="with --engine ray: most input shards read and decoded at once (default: as many as CPUs allow)",
    )


def _add_verify_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        VERIFY,
        help="check a cache written by `codec cache`: counts, keys, shapes, readability (with --model, its codec)",
        description="Check that a cache is complete, consistent and readable; with --model, also that it was made "
        "with that codec. Exit status 1 when a problem is found.",
    )
    parser.add_argument("cache", metavar="OUT", type=Path, help="the cache folder (OUT of `codec cache`)")
    parser.add_argument(
        "--model",
        default=None,
        help="also check the cache was made with this codec (default: the codec is not checked)",
    )
    parser.set_defaults(run=run_verify)


def _add_stats_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="per-channel latent mean/std and scaling factor of a cache or dataset; --write-config into a model",
        description="Latent statistics over a cache (OUT of `codec cache`) or a dataset (encoded at --resolution). "
        "--write-config DIR puts scaling_factor = 1/std into DIR/config.json (with --channel-stats: per-channel "
        "latents_mean/latents_std and scaling_factor 1.0, diffusers' SDXL-pipeline convention).",
    )
    parser.add_argument("source", metavar="SRC", help="a cache folder, or images/dataset as for `codec cache`")
    parser.add_argument("--limit", type=int, default=None, help="for a dataset: this many evenly spaced images")
    parser.add_argument(
        "--posterior", choices=("sample", "mean"), default="sample", help="statistics of z sampled or the mean"
    )
    parser.add_argument("--write-config", type=Path, metavar="MODEL_DIR", help="diffusers folder of the same codec")
    parser.add_argument(
        "--channel-stats",
        action="store_true",
        help="with --write-config: per-channel latents_mean/std and scaling_factor 1.0 instead of 1/std",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    _add_encoding_options(parser, default_model="'builtin' (a cache's statistics need no model)")
    parser.set_defaults(run=run_stats)


MODEL_REQUIRED = (
    "--model is required: a cache is only of use to a diffusion model trained on the same codec's latents (e.g. "
    "--model stabilityai/sd-vae-ft-mse for SD 1.x/2.x). The embedded model's latents match no diffusion model; "
    "name it, --model builtin, to use it anyway"
)


def _output(text: str) -> Path | str:
    """-o: a local folder, or an fsspec URL (kept as written: a Path would fold its '//')."""
    from codec.cache.locations import is_url

    return text if is_url(text) else Path(text)


def _settings(args: argparse.Namespace, flip: bool = False, latent_dtype: str = "fp16", shard_size: int = 1000):
    from codec.cache.preprocess import Preprocessing
    from codec.cache.writer import Settings

    if not args.buckets and (args.bucket_step is not None or args.max_aspect is not None):
        raise ValueError("--bucket-step and --max-aspect shape aspect buckets: add --buckets, or leave them out")
    extra = {"max_pixels": args.max_pixels} if args.max_pixels is not None else {}
    preprocessing = Preprocessing(
        args.resolution,
        buckets=args.buckets,
        bucket_step=DEFAULT_BUCKET_STEP if args.bucket_step is None else args.bucket_step,
        max_aspect=DEFAULT_MAX_ASPECT if args.max_aspect is None else args.max_aspect,
        flip=flip,
        resample=args.resample,
        **extra,
    )
    return Settings(preprocessing, latent_dtype, args.batch_size, args.num_workers, shard_size)


def _load(args: argparse.Namespace, device=None):
    """The model as stored (float32) for its identity, then moved and cast for encoding."""
    from codec.cache.identity import model_identities
    from codec.model import AutoencoderKL

    vae = AutoencoderKL.load(args.model or "builtin")
    identities = model_identities(vae)
    if getattr(args, "compile", False):
        vae.enable_compile()
    return vae.to(device=device or resolve_device(args.device), dtype=DTYPES[args.dtype]).eval(), identities


def run_cache(args: argparse.Namespace) -> int:
    if args.model is None:
        raise ValueError(MODEL_REQUIRED)
    from codec.cache.sources import open_source
    from codec.cache.writer import CacheModel, Group, build_cache
    from codec.cli.outputs import refuse_model_paths
    from codec.distributed import launched_world_size, make_accelerator, shutdown

    settings = _settings(args, args.flip, args.latent_dtype, args.shard_size)  # refused settings cost no model load
    if args.engine == "ray" or _ray_options_given(args):
        _check_ray_run(args)
    if isinstance(args.output, Path):  # a URL cannot be the model's folder
        refuse_model_paths([args.output / "manifest.json"], args.model)
    accelerator = None
    if launched_world_size() > 1:
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        # A resume gives the processes uneven work: early finishers wait at the last barrier past the default timeout.
        accelerator = make_accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])
    device = accelerator.device if accelerator is not None and args.device == "auto" else None
    if args.engine == "ray":  # the encoders take the model to the GPU Ray gives them
        device = torch.device("cpu")
    vae, identities = _load(args, device)
    columns = None  # all there are
    if args.columns is not None:  # "none" (or "") carries none: a stray NAME.txt must not change what is carried
        columns = [c.strip() for c in args.columns.split(",") if c.strip() and c.strip().lower() != "none"]
    group = Group(accelerator)
    model = CacheModel(vae, identities, str(args.model))
    if args.streaming or _is_shard_source(args.source):
        summary = _run_shards(args, columns, model, settings, group)
    else:
        if isinstance(args.output, str):
            raise ValueError(
                f"{args.output}: a cache of {args.source} is written to a local folder; URLs are for shards"
            )
        source = open_source(args.source, split=args.split, image_column=args.image_column, columns=columns)
        summary = build_cache(source, args.output, model, settings, group=group)
    if accelerator is not None:
        shutdown(accelerator)  # only on success: a failed rank exits and the launcher ends the others
    if group.is_main:
        print(
            f"{args.output}: {summary.rows} of {summary.images} images cached in {summary.shards} shards "
            f"({summary.reused} already done, {summary.written} written now) in {summary.seconds:.1f} s"
        )
        if summary.skipped:
            print(f"skipped {summary.skipped} unreadable images; reasons in {args.output}/skipped.jsonl")
        if summary.images and not summary.rows:
            print(
                f"warning: every image was skipped, so the cache is empty (a .txt list's paths are relative to "
                f"the list); the reasons are in {args.output}/skipped.jsonl"
            )
        _warn_upscaled(summary.upscaled, summary.rows, args.resolution)
    return 0


def _is_shard_source(source: str) -> bool:
    from codec.cache.patterns import is_shard_source

    return is_shard_source(source)


def _run_shards(args: argparse.Namespace, columns, model, settings, group):
    """Input shards (tars, Parquet files, a streamed dataset), planned and written shard by shard."""
    from codec.cache.by_input import build_by_input
    from codec.cache.shard_sources import open_shard_source

    source = open_shard_source(
        args.source, image_column=args.image_column, columns=columns, streaming=args.streaming, split=args.split
    )
    if args.engine == "ray":
        from codec.cache.ray_engine import RayOptions, build_with_ray

        options = RayOptions(args.address, args.gpus_per_encoder, args.encoders, args.decoders, args.compile)
        return build_with_ray(source, str(args.output), model, settings, options)
    return build_by_input(source, str(args.output), model, settings, group=group)


def _ray_options_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in ("address", "gpus_per_encoder", "encoders", "decoders"))


def _check_ray_run(args: argparse.Namespace) -> None:
    """Before the model loads: --engine ray's options, sources and Ray itself, each refused in one line."""
    from codec.cache.ray_engine import import_ray
    from codec.distributed import launched_world_size

    if args.engine != "ray":
        raise ValueError("--address, --gpus-per-encoder, --encoders and --decoders are options of --engine ray")
    if not (args.streaming or _is_shard_source(args.source)):
        raise ValueError(
            f"{args.source}: --engine ray encodes input shards (tars, Parquet files, --streaming); an image folder, "
            "list or dataset is cached by the default engine"
        )
    if launched_world_size() > 1:
        raise ValueError("--engine ray schedules its own workers: run it once, not under accelerate launch")
    if args.device != "auto":
        raise ValueError(f"--device {args.device}: with --engine ray each encoder uses the GPU Ray gives it, if any")
    import_ray()


def _warn_upscaled(upscaled: int, rows: int, resolution: int) -> None:
    if upscaled:
        print(
            f"warning: {upscaled} of {rows} images were smaller than their bucket (about "
            f"{resolution}x{resolution}) and were enlarged to fill it: is --resolution right for this data?"
        )


def run_verify(args: argparse.Namespace) -> int:
    from codec.cache.verify import verify_cache
    from codec.model import AutoencoderKL

    codec = AutoencoderKL.load(args.model) if args.model else None
    report = verify_cache(args.cache, codec)
    for problem in report.problems:
        print(f"problem: {problem}")
    if not report.ok:
        print(f"{args.cache}: {len(report.problems)} problem(s)")
        return 1
    checked = " and codec" if codec else ""
    print(
        f"{args.cache}: OK, {report.rows} rows and {report.skipped} skipped in {report.shards} shards (counts, keys, "
        f"shapes, value ranges, checksums{checked} checked)"
    )
    if report.unchecked:
        print(f"checksum check skipped for {report.unchecked} shard(s): written before checksums were recorded")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from codec.cache.stats import cache_stats, write_config

    if args.limit is not None and args.limit < 1:  # 0 reads as "no limit" elsewhere: refused, not guessed
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.channel_stats and not args.write_config:
        raise ValueError("--channel-stats says what --write-config DIR writes; give both")
    root = Path(args.source)
    is_cache = (root / "manifest.json").is_file()
    settings = None if is_cache else _settings(args)  # refused settings cost no model load; a cache has its own
    target = None
    if args.write_config:  # before the encoding, which may take long: a wrong folder must fail first
        from codec.model import AutoencoderKL

        target = AutoencoderKL.load(args.write_config)
    if is_cache:
        result = cache_stats(root, args.posterior)
        if not args.json:
            _warn_upscaled(result["upscaled"], result["rows"], result["resolution"])
    else:
        from codec.cache.sources import SampleSource, open_source
        from codec.cache.writer import CacheModel, build_cache

        vae, identities = _load(args)
        source = open_source(args.source, split=args.split, image_column=args.image_column, columns=[])
        if args.limit:
            source = SampleSource(source, args.limit)
        with tempfile.TemporaryDirectory(prefix="codec-stats-") as tmp:
            summary = build_cache(source, tmp, CacheModel(vae, identities, str(args.model or "builtin")), settings)
            result = cache_stats(tmp, args.posterior)
        result.update(cache=None, source=str(args.source), skipped=summary.skipped, upscaled=summary.upscaled)
        if not args.json:
            _warn_upscaled(summary.upscaled, summary.rows, args.resolution)
    if target is not None:
        from codec.cache.identity import same_codec

        if not same_codec(target, [result["identity"]]):
            raise ValueError(f"{args.write_config}: not the codec these latents were made with ({result['identity']})")
        result["wrote"] = str(write_config(args.write_config, result, channel_stats=args.channel_stats))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    skipped = f"; {result['skipped']} unreadable skipped" if result.get("skipped") else ""
    print(
        f"{result['images']} images{skipped}, {result['values_per_channel']} values per channel "
        f"({args.posterior} posterior)"
    )
    for channel, (mean, std) in enumerate(zip(result["latents_mean"], result["latents_std"], strict=True)):
        print(f"  channel {channel}: mean {mean:+.5f}  std {std:.5f}")
    print(f"all channels: mean {result['mean']:+.5f}  std {result['std']:.5f}")
    print(
        f"scaling_factor = 1 / std = {result['scaling_factor']:.5f}   (shift_factor, if used: {result['shift_factor']:.5f})"
    )
    if "wrote" in result:
        what = "latents_mean, latents_std and scaling_factor 1.0" if args.channel_stats else "scaling_factor"
        if "latent_norm" in result:  # FLUX.2: its statistics live in its weights
            what = "the batch-norm statistics of patched latents (bn.running_mean, bn.running_var)"
        print(f"wrote {what} to {result['wrote']}")
    return 0
