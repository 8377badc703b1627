"""Helpers for the tests/test_cache_*.py modules: small generated images, a tiny model folder, a quick build."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import codec
from codec.cache.identity import model_identities
from codec.cache.preprocess import Preprocessing
from codec.cache.sources import open_source
from codec.cache.writer import CacheModel, Settings, build_cache
from codec.cli import main


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    """A gradient plus noise: enough structure that crops and flips show, cheap to make."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, (40 * seed) % 256)], axis=2)
    noise = np.random.default_rng(seed).normal(0, 10, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def image_folder(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Images img000.png, img001.png, ... of the given (height, width) sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate(sizes):
        Image.fromarray(smooth_image(index, height, width)).save(folder / f"img{index:03d}.png")
    return folder


def tiny_model_dir(folder: Path) -> Path:
    """The tiny preset with seed-0 random weights, saved as a diffusers folder."""
    codec.AutoencoderKL.load("preset:tiny").save_pretrained(folder)
    return folder


def build(source, out: Path, model_dir: Path, identities=model_identities, **options):
    """build_cache with a freshly loaded model; options go to Preprocessing or Settings; `identities` names it."""
    prep_fields = {"resolution", "buckets", "bucket_step", "max_aspect", "flip", "max_pixels"}
    prep = Preprocessing(**{"resolution": 32, **{k: v for k, v in options.items() if k in prep_fields}})
    run = {k: v for k, v in options.items() if k in ("on_shard_written", "group")}
    rest = {k: v for k, v in options.items() if k not in prep_fields and k not in run}
    settings = Settings(prep, **{"batch_size": 2, "shard_size": 3, "progress": False, **rest})
    vae = codec.AutoencoderKL.load(model_dir)
    source = open_source(source) if isinstance(source, (str, Path)) else source
    return build_cache(source, out, CacheModel(vae, identities(vae), str(model_dir)), settings, **run)


def read_rows(out: Path) -> list[dict]:
    """Every row of a cache (all shards' files in data/) as Python values, in key order."""
    import pyarrow.parquet as pq

    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda row: row["key"])


def planned(keys, shard_size: int = 3) -> list[list[str]]:
    """The keys of each shard a cache of these keys is written in, in key order (blocks of codec.cache.key_blocks)."""
    from codec.cache.key_blocks import plan_blocks

    keys = sorted(keys)
    return [keys[block.start : block.stop] for block in plan_blocks(keys, shard_size)]


def folder_keys(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


def shard_files(out: Path) -> list[Path]:
    """A complete cache's shard files, in the manifest's (key) order."""
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    return [out / entry["file"] for entry in manifest["shards"]]


def shard_keys(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


def cli(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def perturbed_copy(model_dir: Path, folder: Path, part: str = "encoder") -> Path:
    """The same model with one weight of `part` nudged: for the encoder, another codec as far as a cache is
    concerned; for the decoder, a decoder-only fine-tune that makes the same latents."""
    vae = codec.AutoencoderKL.load(model_dir)
    with torch.no_grad():
        getattr(vae, part).conv_in.weight[0, 0, 0, 0] += 1e-3
    vae.save_pretrained(folder)
    return folder
