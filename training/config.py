"""The trainer's configuration: typed sections read from YAML, overridden as `section.key=value`, saved with each run.

Every key is a typed dataclass field, so a typo or a wrong type fails at load time, naming the file or override
that caused it, instead of training for hours on a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SHIPPED_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A training config that cannot be used: unknown key, wrong type, invalid value or malformed override."""


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a float needs a dot: `lr: 1e-5` would arrive as the string '1e-5'."""


class _Dumper(yaml.SafeDumper):
    """Knows the same float syntax as _Loader, so it quotes a string like '1e5' and the round trip keeps it a string."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
    )
# betas are a tuple in Python and an inline list in YAML: `betas: [0.5, 0.9]`.
_Dumper.add_representer(tuple, lambda dumper, v: dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _fail(message: str) -> typing.NoReturn:
    raise ConfigError(message)


def _describe(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "").replace("NoneType", "None")


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """`value` checked against type `kind`. Only lists become tuples and ints floats; '3' for an int is an error."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _coerce(value, option, name)
            except ConfigError:
                pass
        _fail(f"{name}: expected {_describe(kind)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(kind):
            return value
        # YAML 1.1 reads an unquoted no/yes/off/on as a bool: `mixed_precision: no` arrives as False.
        hint = " (quote the word: YAML reads no/yes/off/on as false/true)" if isinstance(value, bool) else ""
        _fail(f"{name}: must be one of {', '.join(map(repr, typing.get_args(kind)))}, got {value!r}{hint}")
    if origin is tuple:  # fixed length, e.g. betas: tuple[float, float]
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(f"{name}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(item, arg, f"{name}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True)))
    # bool is a subclass of int, but `max_steps: true` is a mistake, not 1.
    if isinstance(value, bool) and kind is not bool:
        _fail(f"{name}: expected {_describe(kind)}, got {value!r}")
    if kind is float and isinstance(value, int):
        return float(value)
    if isinstance(value, kind):
        return value
    _fail(f"{name}: expected {_describe(kind)}, got {type(value).__name__} {value!r}")


class _Section:
    """Checks field types on construction, so a config built in Python is held to the same rules as a YAML one."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f"{self._name()}.{f.name}"))
            # An empty name or path is never meant; null is how an optional one is left unset.
            self._require(lambda v: not isinstance(v, str) or v.strip(), "must not be empty", f.name)
        self.validate()

    def _name(self) -> str:
        return next(name for name, cls in SECTIONS.items() if isinstance(self, cls))

    def _require(self, test: Callable[[Any], Any], requirement: str, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value is not None and not test(value):  # None means "off" wherever a key allows it
                _fail(f"{self._name()}.{key} {requirement}, got {value!r}")

    def validate(self) -> None:
        """Constraints on values beyond their types; each section adds its own."""


@dataclass
class ModelConfig(_Section):
    init: str | None = None  # hub id, diffusers folder or single file, read by codec.AutoencoderKL.load
    preset: str | None = None  # a codec preset name: random weights, training from scratch
    config: str | None = None  # a config.json path: random weights, training from scratch
    decoder_only: bool = False  # freeze the encoder (and quant_conv) so the latent space stays as it is
    gradient_checkpointing: bool = False
    # From scratch only: the posterior's log-variance starts near this value instead of near 0. A posterior with
    # unit variance buries a freshly initialised encoder's small means in noise, and with LDM's tiny KL weight
    # nothing but that noise pushes the variance down, so early training crawls; see training.model.
    init_logvar: float | None = None

    def validate(self) -> None:
        if self.init_logvar is not None and self.init is not None:
            _fail("model.init_logvar applies to training from scratch (model.preset or model.config), not model.init")
        given = [key for key in ("init", "preset", "config") if getattr(self, key) is not None]
        if len(given) != 1:
            _fail(
                "model: set exactly one of model.init (pretrained weights), model.preset or model.config "
                f"(random weights from a codec preset or a config.json); got {' and '.join(given) or 'none'}"
            )
        if self.preset is not None:
            from codec.config import ConfigError as CodecConfigError  # lazy: codec imports torch
            from codec.config import preset

            try:
                preset(self.preset)
            except CodecConfigError as error:
                _fail(f"model.preset: {error}")


@dataclass
class DataConfig(_Section):
    train: str  # image folder, file list, or a `datasets` name / local dataset path
    validation: str | None = None
    validation_fraction: float = 0.0  # split off the training set with a fixed seed when validation is None
    validation_images: int = 16
    image_column: str = "image"
    split: str = "train"  # the split data.train reads, where it is a dataset with several
    # The split data.validation reads; left out: "validation" where data.validation is data.train (a dataset's
    # held-out split), else data.split (a separate dataset, often with one split).
    validation_split: str | None = None
    resolution: int = 256
    random_flip: bool = True
    num_workers: int = 2

    def validate(self) -> None:
        self._require(lambda v: 0 <= v < 1, "must be in [0, 1)", "validation_fraction")
        if self.validation is not None and self.validation_fraction > 0:
            _fail("data: set data.validation or data.validation_fraction, not both")
        if self.validation_split is not None and self.validation is None:
            _fail("data.validation_split: the split of data.validation, which is not set")
        self._require(lambda v: v >= 1, "must be at least 1", "validation_images")
        # Crops must be whole latents: every preset downsamples by 8, and padding would train on blank borders.
        self._require(lambda v: v >= 8 and v % 8 == 0, "must be a positive multiple of 8", "resolution")
        self._require(lambda v: v >= 0, "must be >= 0", "num_workers")


@dataclass
class LossConfig(_Section):
    pixel: Literal["l1", "l2"] = "l1"
    pixel_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"
    kl_weight: float = 1e-6
    disc_start: int | None = None  # step at which the discriminator starts; None = no discriminator
    disc_weight: float = 0.5
    disc_layers: int = 3
    adaptive_disc_weight: bool = True  # LDM's balance of adversarial against reconstruction gradient norms

    def validate(self) -> None:
        self._require(lambda v: v >= 0, "must be >= 0", "pixel_weight", "lpips_weight", "kl_weight", "disc_weight")
        self._require(lambda v: v >= 0, "must be >= 0", "disc_start")
        self._require(lambda v: v >= 1, "must be at least 1", "disc_layers")
        if self.pixel_weight == 0 and self.lpips_weight == 0:
            _fail("loss: pixel_weight and lpips_weight are both 0, so nothing asks for a faithful reconstruction")


@dataclass
class OptimizerConfig(_Section):
    lr: float = 4.5e-6
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float | None = 1.0  # None = no clipping
    disc_lr: float | None = None  # None = same as lr
    ema_decay: float | None = None  # None = no EMA
    scale_lr: bool = False  # LDM: lr (and disc_lr) x batch_size x accumulation x processes; see learning_rates

    def validate(self) -> None:
        self._require(lambda v: v > 0, "must be > 0", "lr", "max_grad_norm", "disc_lr")
        self._require(lambda v: v >= 0, "must be >= 0", "weight_decay", "warmup_steps")
        self._require(lambda v: all(0 <= beta < 1 for beta in v), "must both be in [0, 1)", "betas")
        self._require(lambda v: 0 < v < 1, "must be in (0, 1)", "ema_decay")


@dataclass
class RunConfig(_Section):
    output_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer steps, each of batch_size x gradient_accumulation_steps x processes images
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # the latest N: a damaged last one leaves a complete one to resume from
    validate_every: int = 250
    log_every: int = 10
    log_with: str | None = "tensorboard"  # an accelerate tracker name; None = no tracker
    resume: bool | str = False  # True = latest checkpoint in output_dir; a string = that checkpoint
    export: bool = True  # write the final (EMA if any) model as a diffusers folder at the end
    record_data_order: bool = False  # write each step's image indices per process (data_order.rank<N>.txt)
    # A wall-clock safety net for budgeted runs (scripts/train_for.py sets it): past this many minutes of the
    # loop, stop after the current step (at the next log step under several processes, which must agree) with the
    # usual validation, checkpoint and export. The schedule still assumes max_steps, so a run stopped this way has
    # not annealed; None = no limit.
    time_limit_minutes: float | None = None

    def validate(self) -> None:
        counts = ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints")
        self._require(lambda v: v >= 1, "must be at least 1", *counts, "validate_every", "log_every")
        self._require(lambda v: v >= 0, "must be >= 0", "seed")
        self._require(lambda v: v is None or v > 0, "must be > 0 (or null for no limit)", "time_limit_minutes")


# Keys under their earlier names, so that the config.yaml of an earlier run (and a config written then) loads.
RENAMED = {("run", "checkpoints_to_keep"): "keep_checkpoints"}

SECTIONS = dict(model=ModelConfig, data=DataConfig, loss=LossConfig, optimizer=OptimizerConfig, run=RunConfig)


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                _fail(f"{name}: expected a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    def learning_rates(self, num_processes: int) -> tuple[float, float]:
        """(autoencoder lr, discriminator lr) as the optimizers should use them, after LDM's scale_lr if enabled."""
        opt, run = self.optimizer, self.run
        scale = run.batch_size * run.gradient_accumulation_steps * num_processes if opt.scale_lr else 1
        return opt.lr * scale, (opt.disc_lr if opt.disc_lr is not None else opt.lr) * scale


def _check_key(section: Any, key: Any, source: str) -> None:
    """Unknown names fail with the closest known one, since most are typos (`max_step` for `max_steps`)."""

    def suggest(word: str, options: list[str]) -> str:
        close = difflib.get_close_matches(word, options, n=1)
        return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(options)}"

    if section not in SECTIONS:
        _fail(f"{source}: unknown section {section!r}{suggest(str(section), list(SECTIONS))}")
    known = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key is not None and key not in known:
        _fail(f"{source}: unknown key {section}.{key}{suggest(str(key), known)}")


def _merge_overrides(data: dict[str, dict], sources: dict[tuple[str, str], str], overrides: Sequence[str]) -> None:
    for text in overrides:
        name, equals, raw = text.partition("=")
        section, _, key = name.strip().partition(".")
        key = RENAMED.get((section, key), key)
        if not equals or not section or not key or "." in key:
            _fail(f"malformed override {text!r}: expected section.key=value, e.g. run.max_steps=1000")
        source = f"override {text!r}"
        _check_key(section, key, source)
        try:
            value = yaml.load(raw, Loader=_Loader)  # `key=` gives None, i.e. null
        except yaml.YAMLError as error:
            _fail(f"{source}: cannot parse the value: {error}")
        data.setdefault(section, {})[key] = value
        sources[(section, key)] = source


def _build(data: dict[str, dict], sources: dict[tuple[str, str], str], origin: str) -> TrainConfig:
    sections = {}
    for name, cls in SECTIONS.items():
        values, hints = dict(data.get(name, {})), typing.get_type_hints(cls)
        for key, value in values.items():  # key by key first, so a type error names the file or override to fix
            try:
                values[key] = _coerce(value, hints[key], f"{name}.{key}")
            except ConfigError as error:
                _fail(f"{sources.get((name, key), origin)}: {error}")
        where = ", ".join(dict.fromkeys(sources.get((name, key), origin) for key in values)) or origin
        for f in dataclasses.fields(cls):
            if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(f"{where}: {name}.{f.name} is required (set it in the file or with {name}.{f.name}=...)")
        try:
            sections[name] = cls(**values)
        except ConfigError as error:
            _fail(f"{where}: {error}")
    return TrainConfig(**sections)


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """A new config with `section.key=value` overrides applied; values are YAML (numbers, true, null, [a, b])."""
    data, sources = dataclasses.asdict(config), {}
    _merge_overrides(data, sources, overrides)
    return _build(data, sources, "config with overrides")


# Paths in the shipped configs name files of this repository (tests/data/photos, training/configs/builtin.json,
# data/train as scripts/prepare_training_data.py writes it): found from the repository root when the working
# folder has no such path, so `--config tiny` runs from anywhere.
REPOSITORY_PATHS = {("data", "train"), ("data", "validation"), ("model", "config"), ("model", "init")}


def _from_repository_root(section: str, key: str, value):
    if (section, key) not in REPOSITORY_PATHS or not isinstance(value, str) or Path(value).is_absolute():
        return value
    in_repository = SHIPPED_CONFIGS.parent.parent / value
    return str(in_repository) if not Path(value).exists() and in_repository.exists() else value


def shipped_config_names() -> list[str]:
    """The configs `--config NAME` finds in training/configs/."""
    return sorted(path.stem for path in SHIPPED_CONFIGS.glob("*.yaml"))


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (None: start from the defaults), then apply `section.key=value` overrides in order.

    `path` may also be the bare name of a shipped config, e.g. "tiny" for training/configs/tiny.yaml.
    """
    data: dict[str, dict] = {}
    sources: dict[tuple[str, str], str] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.exists() and (SHIPPED_CONFIGS / f"{path}.yaml").is_file():
            path = SHIPPED_CONFIGS / f"{path}.yaml"
        origin = str(path)
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except OSError as error:
            shipped = "" if path.suffix else f" (shipped configs: {', '.join(shipped_config_names())})"
            _fail(f"{path}: cannot read the config: {error.strerror or error}{shipped}")
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            _fail(f"{path}: not valid YAML: {error}")
        if not isinstance(loaded, dict):
            _fail(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
        for section, values in loaded.items():
            _check_key(section, None, origin)
            if not isinstance(values, (dict, type(None))):  # None: a section whose keys are all commented out
                _fail(f"{path}: section {section!r} must be a mapping of key: value")
            for key, value in (values or {}).items():
                key = RENAMED.get((section, key), key)
                _check_key(section, key, origin)
                if path.resolve().parent == SHIPPED_CONFIGS.resolve():
                    value = _from_repository_root(section, key, value)
                data.setdefault(section, {})[key] = value
                sources[(section, key)] = origin
    _merge_overrides(data, sources, overrides)
    return _build(data, sources, origin)


def to_yaml(config: TrainConfig) -> str:
    """The config as YAML that `load_config` reads back to an equal config."""
    return yaml.dump(dataclasses.asdict(config), Dumper=_Dumper, sort_keys=False)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write `to_yaml(config)` atomically, so a run killed while saving never leaves a half-written config."""
    from codec.atomic import atomic_write_text  # lazy: importing codec imports torch

    atomic_write_text(path, to_yaml(config))
