"""One cache row made into a training item, the same way for the map-style `LatentDataset` and the streaming
`LatentStream`: the checks that a cache may be read with a codec, latent scaling, posterior sampling and flips
seeded by (seed, epoch, index), and the batch collation both readers use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from codec.cache.identity import identity_of, same_codec
from codec.cache.location import CacheLocation
from codec.cache.shards import RESERVED_COLUMNS, CacheError

log = logging.getLogger(__name__)
META_COLUMNS = ("key", "shape", "bucket", "original_size", "crop_top_left", "crop_box")
# The conditioning columns an item carries as tensors: (name, values per row, dtype).
CONDITIONING = (("original_size", 2, np.int64), ("crop_top_left", 2, np.int64), ("crop_box", 4, np.float32))
LATENT_NUMPY = {"fp16": np.float16, "bf16": np.int16, "fp32": np.float32}  # bf16 is kept as its raw bits


def open_cache(location: CacheLocation, codec: Any) -> dict:
    """The manifest of a complete cache made with `codec` (None: unchecked), or a CacheError saying why not."""
    if not location.is_dir():
        raise CacheError(f"{location}: no such cache folder")
    manifest = location.read_manifest()
    if manifest is None:
        raise CacheError(f"{location}: no manifest.json; not a cache written by `codec cache`")
    if not manifest.get("complete"):
        raise CacheError(f"{location}: the cache is incomplete (a run was interrupted); run `codec cache` again")
    info = manifest["codec"]
    if codec is not None and not same_codec(codec, info["identities"].values()):
        raise CacheError(
            f"{location}: encoded with codec {info['identity']} ({info['model']}), but the codec given is "
            f"{identity_of(codec)}; latents of other weights would train the diffusion model on the wrong latent space. "
            "Cache the data again with this codec."
        )
    return manifest


def carried_columns(names: Sequence[str], columns: Sequence[str] | str | None, where: str) -> list[str]:
    """The carried columns to read of a shard with columns `names`: all of them, or those asked for."""
    if isinstance(columns, str):
        columns = [columns]  # columns="caption" means the one column, not its letters
    carried = [n for n in names if n not in RESERVED_COLUMNS]
    wanted = carried if columns is None else list(columns)
    given = [c for c in wanted if c in RESERVED_COLUMNS]
    if given:
        raise CacheError(
            f"columns={given}: every item has these already; columns= chooses among the carried columns, here {carried}"
        )
    unknown = [c for c in wanted if c not in carried]
    if unknown:
        raise CacheError(f"{where}: no column(s) {unknown}; the cache carries {carried}")
    return wanted


class _Obj:
    """Attribute access to the manifest's codec section, to read scaling like a model config."""

    def __init__(self, data: dict) -> None:
        self.__dict__.update(data)


class ItemMaker:
    """Makes items from a row's stored latents: scaling as the codec's config says, posterior sampling and flips
    seeded by (seed, epoch, index). See `LatentDataset` for what each option means."""

    def __init__(
        self,
        manifest: dict,
        where: str,
        codec: Any,
        *,
        posterior: str,
        seed: int,
        flip: bool,
        has_flip: bool,
        scaling_factor: float | None,
        shift_factor: float | None,
        normalize: str | None,
    ) -> None:
        if posterior not in ("sample", "mean") or normalize not in (None, "scaling", "channel"):
            raise ValueError(
                f"posterior must be 'sample' or 'mean', normalize None, 'scaling' or 'channel'; got {posterior!r}, {normalize!r}"
            )
        # A model's config wins over the manifest: `codec stats --write-config` may have updated it since.
        config = codec.config if hasattr(codec, "config") else _Obj(manifest["codec"])
        self.scaling_factor = scaling_factor if scaling_factor is not None else config.scaling_factor
        self.shift_factor = (shift_factor if shift_factor is not None else config.shift_factor) or 0.0
        has_statistics = config.latents_mean is not None and config.latents_std is not None
        factors_given = scaling_factor is not None or shift_factor is not None  # asks for (z - shift) * scaling
        self.batch_norm = _batch_norm(codec, manifest["codec"], where, asked=normalize is not None or factors_given)
        self.normalize = normalize or ("channel" if has_statistics and not factors_given else "scaling")
        self.posterior, self.seed, self.flip = posterior, seed, flip and has_flip
        self.latent_dtype = manifest["storage"]["latent_dtype"]
        if self.normalize == "channel":
            stats = config.latents_mean, config.latents_std
            if stats[0] is None or stats[1] is None:
                raise CacheError(
                    f"{where}: normalize='channel' needs latents_mean and latents_std (`codec stats ... --write-config DIR --channel-stats`)"
                )
            self.channel = tuple(torch.tensor(s, dtype=torch.float32).view(-1, 1, 1) for s in stats)
        elif has_statistics:
            log.warning(
                "%s: the codec records per-channel latents_mean/std (`codec stats --channel-stats`), which "
                "normalize='scaling' leaves unused (asked for, or implied by a scaling_factor or shift_factor "
                "given; scaling factor %s); the default applies them",
                where,
                self.scaling_factor,
            )

    @property
    def latent_columns(self) -> list[str]:
        """Only the columns this reader uses: logvar for sampling, the mirrored ones for flips."""
        prefixes = ["", "flip_"] if self.flip else [""]
        fields = ["mean", "logvar"] if self.posterior == "sample" else ["mean"]
        return [prefix + field for prefix in prefixes for field in fields]

    def _tensor(self, values: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
        flat = torch.from_numpy(values.copy())
        if self.latent_dtype == "bf16":
            flat = flat.view(torch.bfloat16)
        return flat.float().reshape(*shape)

    def item(
        self, latents: Mapping[str, np.ndarray], shape: Sequence[int], index: int, epoch: int, fields: dict
    ) -> dict:
        """The item of global row `index`: `latents` maps each of `latent_columns` to the row's flat values;
        `fields` holds key, bucket, the CONDITIONING arrays and the carried values."""
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        flipped = bool(self.flip and torch.rand((), generator=generator) < 0.5)
        prefix = "flip_" if flipped else ""
        z = self._tensor(latents[prefix + "mean"], shape)
        if self.posterior == "sample":
            std = torch.exp(0.5 * self._tensor(latents[prefix + "logvar"], shape))
            z = z + std * torch.randn(z.shape, generator=generator)
        if self.batch_norm is not None:
            scaled = self.batch_norm.normalize(z)  # FLUX.2: patched, then batch-normalised, as its pipelines
        elif self.normalize == "channel":
            scaled = (z - self.channel[0]) * self.scaling_factor / self.channel[1]  # as diffusers' SDXL pipelines
        else:
            scaled = (z - self.shift_factor) * self.scaling_factor
        item = {"latents": scaled, "key": fields["key"], "bucket": torch.from_numpy(fields["bucket"].copy())}
        item["flipped"] = flipped
        for name, value in fields.items():
            if name not in item:
                item[name] = torch.from_numpy(value.copy()) if isinstance(value, np.ndarray) else value
        if flipped and "crop_box" in item:
            _mirror_crop(item)
        return item


def _batch_norm(codec: Any, info: dict, where: str, asked: bool):
    """FLUX.2's normalisation of patched latents, from the codec given (a model wins, as for scaling) or else the
    manifest; None for a codec that scales by its config."""
    from codec import latent_norm

    if hasattr(codec, "config"):
        norm = latent_norm.of_model(codec)
    else:
        record = info.get("latent_norm")
        try:
            norm = latent_norm.from_record(record) if record is not None else None
        except ValueError as error:
            raise CacheError(f"{where}: manifest codec.latent_norm: {error}") from None
    if norm is not None and asked:
        raise ValueError(
            f"{where}: this codec normalises its latents by the batch-norm statistics of 2x2 patches (FLUX.2); "
            "normalize, scaling_factor and shift_factor do not apply to it"
        )
    return norm


def collate(items: list[dict]) -> dict:
    """Stack tensors (one bucket per batch, so latents stack), bools to a tensor, anything else to a list."""
    shapes = {tuple(item["latents"].shape) for item in items if "latents" in item}
    if len(shapes) > 1:
        raise CacheError(
            f"a batch mixes latent shapes {sorted(shapes)}: batches must come from BucketBatchSampler as it "
            "made them (do not pass the DataLoader to accelerator.prepare, which splits and pads them again)"
        )
    batch = {}
    for name in items[0]:
        values = [item[name] for item in items]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def _mirror_crop(item: dict) -> None:
    """The crop as it lies in the mirrored image, which is what a flipped latent encodes: SDXL conditions on
    crop_top_left, and a crop's left margin becomes its right one when the image is mirrored."""
    width = float(item["original_size"][1])
    left, top, right, bottom = item["crop_box"].tolist()
    item["crop_box"] = torch.tensor([width - right, top, width - left, bottom], dtype=item["crop_box"].dtype)
    bucket_width = float(item["bucket"][1])
    scale = bucket_width / (right - left)  # original pixels -> pixels of the image resized to cover the bucket
    crop_top, _ = item["crop_top_left"].tolist()
    item["crop_top_left"] = torch.tensor([crop_top, round((width - right) * scale)], dtype=item["crop_top_left"].dtype)
