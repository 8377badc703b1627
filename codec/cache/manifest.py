"""OUT/manifest.json: what a cache is (codec identity and config, scaling, preprocessing, source, storage) and,
once complete, its counts and shards. The main process writes it incomplete at the start of a run (so the codec
is named from the first shard on) and complete at the end, from the shards' own footers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from codec import latent_norm
from codec.cache.shards import DATA_DIR, FORMAT, FORMAT_VERSION, MANIFEST, CacheError, atomic_write, shard_path
from codec.version import __version__


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        text = path.read_text()
    except OSError as error:
        raise CacheError(f"{path}: unreadable manifest ({error})") from None
    return parse_manifest(text, path)


def parse_manifest(text: str | bytes, where: str | Path, sections: bool = True) -> dict:
    """A manifest's text, checked: a file edited by hand or by another tool fails here, naming `where`.
    `sections=False` checks only that it is a manifest of ours (a cache of input shards has sections of its own)."""
    try:
        manifest = json.loads(text)
    except ValueError as error:
        raise CacheError(f"{where}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f'{where}: not a latent cache manifest (no "format": {FORMAT!r})')
    if sections:
        _check_shape(where, manifest)
    return manifest


# The sections every reader of a manifest indexes into, and what each must be.
_SECTIONS = {"codec": dict, "preprocessing": dict, "storage": dict, "compat_record": dict, "compat": str}
_COMPLETE_SECTIONS = {"counts": dict, "shards": list}


def _check_shape(path: Path, manifest: dict) -> None:
    """A manifest edited by hand (or by another tool) must fail here, by name, not as a TypeError in a reader."""
    wanted = {**_SECTIONS, **(_COMPLETE_SECTIONS if manifest.get("complete") else {})}
    wrong = [name for name, kind in wanted.items() if not isinstance(manifest.get(name), kind)]
    codec_info = manifest.get("codec")
    if isinstance(codec_info, dict) and not isinstance(codec_info.get("identities"), dict):
        wrong.append("codec.identities")
    shards = manifest.get("shards")
    if isinstance(shards, list) and not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in shards):
        wrong.append("shards")
    if wrong:
        raise CacheError(
            f"{path}: not the manifest `codec cache` writes ({', '.join(wrong)} missing or of another type); "
            "write the cache again into a new folder"
        )


def write_manifest(out: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(Path(out) / MANIFEST, lambda tmp: tmp.write_text(text))


def keys_digest(keys) -> str:
    """One hash of every key a cache must account for (as a row or as skipped), so verify needs no source."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode() + b"\n")
    return "sha256:" + digest.hexdigest()


def build_manifest(
    vae,
    identities: dict,
    model_name: str,
    source,
    settings,
    compat: dict,
    compat_hash: str,
    n_shards: int,
    metas=None,
    files: list[str] | None = None,
) -> dict:
    """The manifest of a cache: complete (with counts and shards) once `metas`, the shards' footers, are given
    (with `files`, the shards' paths relative to the cache, in the same order; by default shard i's by position)."""
    config = vae.config
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "latent-codec", "version": __version__},
        "complete": metas is not None,
        "compat": compat_hash,
        "codec": {
            "identity": compat["identity"],
            "identities": identities,
            "model": model_name,
            "encode_dtype": compat["encode_dtype"],
            "scaling_factor": config.scaling_factor,
            "shift_factor": config.shift_factor,
            "latents_mean": list(config.latents_mean) if config.latents_mean else None,
            "latents_std": list(config.latents_std) if config.latents_std else None,
            "latent_channels": config.latent_channels,
            "downsample_factor": config.downsample_factor,
            "config": config.to_dict(),
        },
        "preprocessing": compat["preprocessing"],
        "source": {**source.descriptor(), "images": len(source.keys), "keys_sha256": keys_digest(source.keys)},
        "storage": {
            "latent_dtype": settings.latent_dtype,
            "posterior": "mean and logvar, raw (unscaled); scale as the codec's encode_latents does: "
            + (
                "(z - latents_mean) * scaling_factor / latents_std, per channel"
                if config.latents_mean is not None and config.latents_std is not None
                else "(z - shift_factor) * scaling_factor"
            ),
            "shard_size": settings.shard_size,
            "data_files": f"{DATA_DIR}/*.parquet",
        },
        "compat_record": compat,
    }
    norm = latent_norm.of_model(vae)
    if norm is not None:  # FLUX.2: the batch-norm statistics of its patched latents, which readers apply
        manifest["codec"]["latent_norm"] = norm.record()
        manifest["storage"]["posterior"] = (
            "mean and logvar, raw (unpatched, unnormalised); as the codec's encode_latents does: 2x2 patches into "
            "channels, then (z - running_mean) / sqrt(running_var + eps) per patched channel (codec.latent_norm)"
        )
    if metas is not None:
        rows, skipped = sum(m["rows"] for m in metas), sum(len(m["skipped"]) for m in metas)
        manifest["counts"] = {"images": len(source.keys), "rows": rows, "skipped": skipped, "shards": n_shards}
        files = files or [f"{DATA_DIR}/{shard_path(Path(), i).name}" for i in range(len(metas))]
        manifest["shards"] = [
            {
                "file": files[i],
                **({"first_key": m["first_key"]} if "first_key" in m else {}),
                "rows": m["rows"],
                "skipped": len(m["skipped"]),
                **({"checksum": m["checksum"]} if "checksum" in m else {}),  # none in shards of earlier versions
            }
            for i, m in enumerate(metas)
        ]
    return manifest
