"""The codec's configuration: the fields and defaults of diffusers' ``AutoencoderKL`` config.json.

Keeping the field names identical means a config.json written by diffusers loads here unchanged and
ours loads in diffusers, so one file describes the model for both libraries. FLUX.2's `AutoencoderKLFlux2` is the
same network with four more fields (an asymmetric decoder, the patch size and batch-norm settings of its latent
normalisation); a config that sets them is written and read under that class name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Keys diffusers writes into every config.json for its own bookkeeping; they carry no model meaning.
DIFFUSERS_BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})
CONFIG_NAME = "config.json"


FLUX2_CLASS_NAME = "AutoencoderKLFlux2"
# diffusers' AutoencoderKLFlux2 defaults, for config.json keys a file leaves out (they differ from AutoencoderKL's).
FLUX2_DEFAULTS = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "decoder_block_out_channels": None,
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
    # Not fields of diffusers' class: its pipelines scale by the batch-norm statistics alone.
    "scaling_factor": 1.0,
    "shift_factor": None,
}
# What config.json holds for it: the keys diffusers' AutoencoderKLFlux2 takes, and force_upcast, as FLUX.2's own has.
FLUX2_KEYS = frozenset(FLUX2_DEFAULTS) - {"scaling_factor", "shift_factor"} | {
    "in_channels",
    "out_channels",
    "force_upcast",
}
# Scaling fields a batch-normalised config must leave at these values: the statistics alone scale its latents.
FLUX2_UNUSED_SCALING = {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": None, "latents_std": None}


class ConfigError(ValueError):
    """A config.json that does not describe an AutoencoderKL we can build."""


@dataclass
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # FLUX.2 (diffusers' AutoencoderKLFlux2): an asymmetric decoder, and latents normalised by the batch-norm
    # statistics of their patches (codec/latent_norm.py). None: an AutoencoderKL, which has neither.
    decoder_block_out_channels: tuple[int, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    batch_norm_eps: float | None = None
    batch_norm_momentum: float | None = None

    def __post_init__(self) -> None:
        self._check_types()
        # JSON gives lists; tuples compare equal to the defaults and cannot be changed in place.
        for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std",
                     *BATCH_NORM_TUPLES):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        if self.patch_size is not None:  # diffusers' defaults where a hand-built config leaves them out
            self.batch_norm_eps = 1e-4 if self.batch_norm_eps is None else self.batch_norm_eps
            self.batch_norm_momentum = 0.1 if self.batch_norm_momentum is None else self.batch_norm_momentum
        self.validate()

    def _check_types(self) -> None:
        """Every field of the type and in the range a real AutoencoderKL has: a config.json written by hand must
        fail here with its field's name, not deep inside torch (or allocate without end: the upper bounds are
        far beyond any released VAE)."""
        for name, high in WHOLE_NUMBER_FIELDS.items():
            _whole(name, getattr(self, name), high)
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {getattr(self, name)!r}")
        if len(self.block_out_channels) > MAX_BLOCKS:
            raise ConfigError(f"block_out_channels: at most {MAX_BLOCKS} blocks, got {len(self.block_out_channels)}")
        for channels in self.block_out_channels:
            _whole("block_out_channels", channels, MAX_CHANNELS)
        if not isinstance(self.sample_size, (list, tuple)):
            _whole("sample_size", self.sample_size, MAX_SIDE)
        else:
            for side in self.sample_size:
                _whole("sample_size", side, MAX_SIDE)
        if not _finite(self.scaling_factor) or self.scaling_factor <= 0:
            raise ConfigError(f"scaling_factor must be a positive number, got {self.scaling_factor!r}")
        if self.shift_factor is not None and not _finite(self.shift_factor):
            raise ConfigError(f"shift_factor must be a number or null, got {self.shift_factor!r}")
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self, name)
            if stats is None:
                continue
            if not isinstance(stats, (list, tuple)) or not all(_finite(v) for v in stats):
                raise ConfigError(f"{name} must be a list of numbers, one per latent channel, or null; got {stats!r}")
        if self.latents_std is not None and any(v <= 0 for v in self.latents_std):
            raise ConfigError(f"latents_std must be positive, got {self.latents_std!r}")
        if not isinstance(self.act_fn, str):
            raise ConfigError(f"act_fn must be a name, got {self.act_fn!r}")
        self._check_batch_norm_types()

    def _check_batch_norm_types(self) -> None:
        for name, high in (("decoder_block_out_channels", MAX_CHANNELS), ("patch_size", MAX_PATCH)):
            values = getattr(self, name)
            if values is None:
                continue
            if not isinstance(values, (list, tuple)):
                raise ConfigError(f"{name} must be a list or null, got {values!r}")
            for value in values:
                _whole(name, value, high)
        for name, low, high in (("batch_norm_eps", 0.0, 1.0), ("batch_norm_momentum", 0.0, 1.0)):
            value = getattr(self, name)
            if value is not None and (not _finite(value) or not low < value <= high):
                raise ConfigError(f"{name} must be a number in ({low}, {high}] or null, got {value!r}")

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("block_out_channels must name at least one block")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) "
                f"and block_out_channels ({n}) must have the same length"
            )
        for kind in self.down_block_types:
            if kind != "DownEncoderBlock2D":
                raise ConfigError(
                    f"unsupported down block type {kind!r}: only 'DownEncoderBlock2D' exists in AutoencoderKL"
                )
        for kind in self.up_block_types:
            if kind != "UpDecoderBlock2D":
                raise ConfigError(
                    f"unsupported up block type {kind!r}: only 'UpDecoderBlock2D' exists in AutoencoderKL"
                )
        if self.act_fn not in ACTIVATIONS:
            raise ConfigError(f"unsupported act_fn {self.act_fn!r}; choose one of {sorted(ACTIVATIONS)}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ConfigError(
                    f"block_out_channels {channels} is not divisible by norm_num_groups {self.norm_num_groups}"
                )
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.latent_channels:
                raise ConfigError(f"{name} has {len(stats)} values but latent_channels is {self.latent_channels}")
        self._validate_batch_norm()

    def _validate_batch_norm(self) -> None:
        if self.decoder_block_out_channels is not None:
            if self.patch_size is None:
                raise ConfigError(
                    f"decoder_block_out_channels is a field of {FLUX2_CLASS_NAME} (set patch_size too); diffusers' "
                    "AutoencoderKL has no asymmetric decoder"
                )
            if len(self.decoder_block_out_channels) != len(self.block_out_channels):
                raise ConfigError(
                    f"decoder_block_out_channels ({len(self.decoder_block_out_channels)}) and block_out_channels "
                    f"({len(self.block_out_channels)}) must have the same length"
                )
            for channels in self.decoder_block_out_channels:
                if channels % self.norm_num_groups:
                    raise ConfigError(
                        f"decoder_block_out_channels {channels} is not divisible by norm_num_groups {self.norm_num_groups}"
                    )
        if self.patch_size is None:
            return
        if len(self.patch_size) != 2:
            raise ConfigError(f"patch_size must be [height, width], got {list(self.patch_size)}")
        wrong = [name for name, value in FLUX2_UNUSED_SCALING.items() if getattr(self, name) != value]
        if wrong:
            raise ConfigError(
                f"{', '.join(wrong)}: a {FLUX2_CLASS_NAME} config scales its latents by the batch-norm statistics alone; "
                "set scaling_factor 1.0 and leave shift_factor, latents_mean and latents_std null"
            )

    def with_settings(self, **settings) -> AutoencoderKLConfig:
        """A copy with new values for fields that leave the weights' meaning alone (SETTING_FIELDS); the
        architecture fields of a built model cannot change, and an unknown name is a typo."""
        check_setting_names(settings)
        settings = {name: tuple(v) if isinstance(v, list) else v for name, v in settings.items()}  # JSON's lists
        fixed = sorted(
            name for name in settings if name not in SETTING_FIELDS and settings[name] != getattr(self, name)
        )
        if fixed:
            raise ConfigError(
                f"{', '.join(fixed)} would change the architecture of built weights; build a model from a new config "
                f"instead (settings that can change: {', '.join(SETTING_FIELDS)})"
            )
        return dataclasses.replace(self, **settings)

    # Read like diffusers' FrozenDict config too (`config["scaling_factor"]`, `"shift_factor" in config`, `.get`,
    # `dict(config)`), which some pipelines and trainers use instead of attributes.
    def keys(self) -> list[str]:
        """The fields `to_dict` writes: FLUX.2's only in its configs, as diffusers' AutoencoderKL has none of them."""
        return list(self.to_dict())

    def __getitem__(self, name: str):
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self.keys() else default

    def items(self) -> list[tuple[str, object]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The decoder's block widths, in the encoder's order (FLUX.2's small decoder is narrower)."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def class_name(self) -> str:
        """The diffusers class this config describes."""
        return FLUX2_CLASS_NAME if self.patch_size is not None else "AutoencoderKL"

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent value along each side: 2 per block after the first."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Latent (C, H, W) for an image of this size; sizes not divisible by the factor are padded up."""
        f = self.downsample_factor
        return (self.latent_channels, -(-height // f), -(-width // f))

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The fields, as JSON values; FLUX.2's fields only where set, so an AutoencoderKL's dict (and the cache
        identities hashed from it) is what it was before they existed."""
        data = dataclasses.asdict(self)
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in data.items()
            if not (key in BATCH_NORM_FIELDS and value is None and self.patch_size is None)
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", strict: bool = True) -> AutoencoderKLConfig:
        """`strict`: an unknown key is an error (a typo in code); otherwise it is ignored with a warning, as
        diffusers does for config.json files, which newer diffusers versions may extend."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - DIFFUSERS_BOOKKEEPING_KEYS)
        if unknown and strict:
            raise ConfigError(f"{source}: unknown AutoencoderKL config key(s) {', '.join(map(repr, unknown))}")
        if unknown:
            log.warning("%s: ignored config key(s) this version does not know: %s", source, ", ".join(unknown))
        class_name = data.get("_class_name")
        if class_name == FLUX2_CLASS_NAME:  # its defaults, not AutoencoderKL's, for the keys a file leaves out
            data = {**FLUX2_DEFAULTS, **data}
        elif class_name not in (None, "AutoencoderKL"):
            raise ConfigError(
                f"{source}: describes a {class_name!r}, not an AutoencoderKL or {FLUX2_CLASS_NAME} (`codec bench` and "
                "`codec roundtrip` run other diffusers autoencoders through diffusers)"
            )
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except (TypeError, ConfigError) as error:
            raise ConfigError(f"{source}: {error}") from error

    @classmethod
    def from_json(cls, path: str | os.PathLike, strict: bool = False) -> AutoencoderKLConfig:
        """A config.json; unknown keys are ignored with a warning, as diffusers does (`strict`: refused)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path), strict=strict)

    def to_json(self, path: str | os.PathLike, diffusers_version: str = "0.30.0") -> None:
        """Write config.json as diffusers does, with its `_class_name` so `from_pretrained` finds the class."""
        from codec.atomic import atomic_write_text

        fields = self.to_dict()
        if self.patch_size is not None:  # only what diffusers' AutoencoderKLFlux2 takes, as its own files hold
            fields = {key: value for key, value in fields.items() if key in FLUX2_KEYS}
        data = {"_class_name": self.class_name, "_diffusers_version": diffusers_version, **fields}
        atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False) + "\n")


ACTIVATIONS = ("silu", "swish", "gelu", "relu", "mish")
# Upper bounds for the whole-number fields: far beyond any released VAE (SD: 3 channels, 2 layers per block, 4
# latent channels, 32 groups; FLUX.2: 32 latent channels), so only a typo reaches them.
WHOLE_NUMBER_FIELDS = {
    "in_channels": 64, "out_channels": 64, "layers_per_block": 64, "latent_channels": 4096, "norm_num_groups": 4096,
}  # fmt: skip
MAX_BLOCKS, MAX_CHANNELS, MAX_SIDE, MAX_PATCH = 8, 16384, 65536, 16
BATCH_NORM_FIELDS = ("decoder_block_out_channels", "patch_size", "batch_norm_eps", "batch_norm_momentum")
BATCH_NORM_TUPLES = ("decoder_block_out_channels", "patch_size")


def _whole(name: str, value, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ConfigError(f"{name} must be a whole number from 1 to {high}, got {value!r}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Fields that say how the latents are scaled and how the model is run, not what the weights compute.
SETTING_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "sample_size")


def check_setting_names(settings: dict) -> None:
    """Refuse a name that is no config field (a typo) before any work, such as a download, is done."""
    known = {f.name for f in dataclasses.fields(AutoencoderKLConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown AutoencoderKL config field(s) {', '.join(map(repr, unknown))}")


def _sd_family(**overrides) -> AutoencoderKLConfig:
    base = dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=512,
    )
    base.update(overrides)
    return AutoencoderKLConfig(**base)


def preset(name: str) -> AutoencoderKLConfig:
    """A named config: 'sd' (SD 1.x/2.x), 'sdxl', 'flux' (16-channel), 'sd3' (16-channel), 'flux2' (32-channel,
    batch-normalised 2x2 patches), 'flux2-small-decoder' (its narrower decoder), 'tiny' or 'flux2-tiny' (tests)."""
    name = name.lower()
    if name in ("sd", "sd1", "sd2", "sd15", "sd-1", "sd-2"):
        return _sd_family(scaling_factor=0.18215)
    if name == "sdxl":
        return _sd_family(scaling_factor=0.13025, sample_size=1024)
    if name == "flux":
        return _sd_family(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            sample_size=1024,
        )
    if name == "sd3":
        return _sd_family(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
            sample_size=1024,
        )
    if name in ("flux2", "flux2-small-decoder", "flux2-tiny"):
        return _flux2_family(name)
    if name == "tiny":
        # Keeps the 8x factor of the real models with a few hundred thousand parameters, for fast tests.
        return _sd_family(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=64)
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def _flux2_family(name: str) -> AutoencoderKLConfig:
    base = {**FLUX2_DEFAULTS, "force_upcast": True}
    if name == "flux2-small-decoder":  # FLUX.2's small decoder: same encoder and latents, narrower decoder
        base["decoder_block_out_channels"] = (96, 192, 384, 384)
    if name == "flux2-tiny":
        # The tiny preset's sizes with FLUX.2's latent handling and an asymmetric decoder, for fast tests.
        base.update(block_out_channels=(32, 64, 64, 64), decoder_block_out_channels=(32, 32, 64, 64))
        base.update(layers_per_block=1, latent_channels=8, sample_size=64)
    return AutoencoderKLConfig(**base)


PRESETS = ("sd", "sdxl", "flux", "sd3", "flux2", "flux2-small-decoder", "tiny", "flux2-tiny")
