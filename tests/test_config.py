"""AutoencoderKLConfig: diffusers' fields and defaults, config.json in both directions, presets, validation."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest

import codec
from codec import AutoencoderKLConfig, ConfigError
from codec.config import BATCH_NORM_FIELDS


def _normalise(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def test_defaults_equal_diffusers_init_defaults():
    import diffusers

    parameters = inspect.signature(diffusers.AutoencoderKL.__init__).parameters
    theirs = {name: p.default for name, p in parameters.items() if name != "self"}
    ours = {field.name: getattr(AutoencoderKLConfig(), field.name) for field in dataclasses.fields(AutoencoderKLConfig)}
    assert set(ours) - set(BATCH_NORM_FIELDS) == set(theirs)  # and FLUX.2's fields (tests/test_flux2.py)
    for name, default in theirs.items():
        assert _normalise(ours[name]) == _normalise(default), name


def test_json_round_trip(tmp_path):
    config = dataclasses.replace(
        codec.preset("tiny"),
        latent_channels=4,
        shift_factor=0.25,
        latents_mean=(0.1, -0.2, 0.3, 0.0),
        latents_std=(1.0, 2.0, 0.5, 1.5),
        force_upcast=False,
        act_fn="gelu",
    )
    path = tmp_path / "config.json"
    config.to_json(path)
    data = json.loads(path.read_text())
    assert data["_class_name"] == "AutoencoderKL"
    assert "_diffusers_version" in data
    assert data["block_out_channels"] == [32, 64, 64, 64]
    loaded = AutoencoderKLConfig.from_json(path)
    assert loaded == config
    assert AutoencoderKLConfig.from_json(tmp_path) == config  # a folder names its config.json
    assert isinstance(loaded.block_out_channels, tuple) and isinstance(loaded.latents_mean, tuple)


def test_unknown_key_raises_config_error_naming_it():
    data = {**codec.preset("tiny").to_dict(), "num_attention_heads": 8}
    with pytest.raises(ConfigError, match="num_attention_heads"):
        AutoencoderKLConfig.from_dict(data)


def test_an_unknown_key_in_a_file_is_ignored_with_a_warning_naming_the_file(tmp_path, caplog):
    # As diffusers reads config.json: a newer diffusers may add fields, and the folder must still load.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**codec.preset("tiny").to_dict(), "bogus_key": 1}))
    with caplog.at_level("WARNING"):
        assert AutoencoderKLConfig.from_json(path) == codec.preset("tiny")
    assert f"{path}: ignored config key(s) this version does not know: bogus_key" in caplog.text
    with pytest.raises(ConfigError, match="bogus_key"):
        AutoencoderKLConfig.from_json(path, strict=True)  # a config written by hand for a training run
    path.write_text(json.dumps({**codec.preset("tiny").to_dict(), "_class_name": "VQModel"}))
    with pytest.raises(ConfigError, match="describes a 'VQModel', not an AutoencoderKL"):
        AutoencoderKLConfig.from_json(path)  # another class is still refused


def test_diffusers_bookkeeping_keys_are_tolerated():
    data = {
        **codec.preset("tiny").to_dict(),
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.31.0",
        "_name_or_path": "stabilityai/sd-vae-ft-mse",
    }
    assert AutoencoderKLConfig.from_dict(data) == codec.preset("tiny")


@pytest.mark.parametrize("class_name", ["UNet2DConditionModel", "AutoencoderTiny"])
def test_wrong_class_name_is_rejected(class_name):
    data = {**codec.preset("tiny").to_dict(), "_class_name": class_name}
    with pytest.raises(ConfigError, match=class_name):
        AutoencoderKLConfig.from_dict(data)


def test_preset_sd():
    config = codec.preset("sd")
    assert config.scaling_factor == 0.18215
    assert config.block_out_channels == (128, 256, 512, 512)
    assert config.layers_per_block == 2
    assert config.latent_channels == 4
    assert config.use_quant_conv and config.use_post_quant_conv
    assert config.shift_factor is None


def test_preset_sdxl():
    config = codec.preset("sdxl")
    assert config.scaling_factor == 0.13025
    assert config.block_out_channels == (128, 256, 512, 512)
    assert config.latent_channels == 4


def test_preset_flux():
    config = codec.preset("flux")
    assert config.latent_channels == 16
    assert not config.use_quant_conv and not config.use_post_quant_conv
    assert config.shift_factor == 0.1159
    model = codec.AutoencoderKL(dataclasses.replace(config, block_out_channels=(32, 32, 32, 32)))
    assert model.quant_conv is None and model.post_quant_conv is None
    assert not any(key.startswith(("quant_conv.", "post_quant_conv.")) for key in model.state_dict())


def test_preset_tiny():
    config = codec.preset("tiny")
    assert config.block_out_channels == (32, 64, 64, 64)
    assert config.layers_per_block == 1
    assert config.downsample_factor == 8


def test_presets_are_listed_and_unknown_preset_fails():
    for name in codec.PRESETS:
        assert isinstance(codec.preset(name), AutoencoderKLConfig)
    with pytest.raises(ConfigError, match="nonsense"):
        codec.preset("nonsense")


def test_config_written_by_diffusers_loads(diffusers_folder, tiny_config):
    data = json.loads((diffusers_folder / "config.json").read_text())
    assert data["_class_name"] == "AutoencoderKL" and "_diffusers_version" in data  # diffusers' bookkeeping is there
    assert AutoencoderKLConfig.from_json(diffusers_folder / "config.json") == tiny_config


def test_config_with_latent_stats_written_by_diffusers_loads(tmp_path):
    import diffusers

    config = dataclasses.replace(
        codec.preset("tiny"),
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        latents_mean=tuple(i / 10 for i in range(16)),
        latents_std=tuple(1 + i / 10 for i in range(16)),
    )
    diffusers.AutoencoderKL(**config.to_dict()).save_pretrained(tmp_path)
    assert AutoencoderKLConfig.from_json(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    "overrides",
    [
        {"down_block_types": ("DownEncoderBlock2D",) * 3},
        {"up_block_types": ("UpDecoderBlock2D",) * 5},
        {"block_out_channels": (32, 64, 64)},
    ],
)
def test_mismatched_block_list_lengths_raise(overrides):
    data = {**codec.preset("tiny").to_dict(), **overrides}
    with pytest.raises(ConfigError, match="same length"):
        AutoencoderKLConfig.from_dict(data)
    with pytest.raises(ConfigError):
        AutoencoderKLConfig(**data)


def test_other_invalid_configs_raise():
    base = codec.preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="norm_num_groups"):
        AutoencoderKLConfig.from_dict({**base, "norm_num_groups": 24})
    with pytest.raises(ConfigError, match="latents_mean"):
        AutoencoderKLConfig.from_dict({**base, "latents_mean": [0.0, 0.0]})
    with pytest.raises(ConfigError, match="act_fn"):
        AutoencoderKLConfig.from_dict({**base, "act_fn": "tanhshrink"})
    with pytest.raises(ConfigError, match="CrossAttnDownBlock2D"):
        AutoencoderKLConfig.from_dict({**base, "down_block_types": ["CrossAttnDownBlock2D"] * 4})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("norm_num_groups", 0), ("norm_num_groups", -32), ("latent_channels", "4"), ("latent_channels", -4),
        ("block_out_channels", [-32, -64, -64, -64]), ("block_out_channels", [32.0, 64, 64, 64]),
        ("block_out_channels", [2**40] * 4), ("block_out_channels", "abcd"), ("layers_per_block", 1.5),
        ("layers_per_block", 1_000_000), ("use_quant_conv", "false"), ("force_upcast", "no"), ("sample_size", "x"),
        ("scaling_factor", "big"), ("scaling_factor", 0), ("scaling_factor", float("nan")), ("shift_factor", "x"),
        ("latents_std", [1.0, 0.0, 1.0, 1.0]), ("latents_mean", ["a", 0, 0, 0]),
    ],
)  # fmt: skip
def test_a_field_of_the_wrong_type_or_range_is_named_before_any_tensor_is_made(field, value):
    # Each had surfaced as a TypeError, ZeroDivisionError or allocation error from inside torch, hung building a
    # million layers, or been taken silently ("false" as true, a zero scaling factor as all-zero latents).
    with pytest.raises(ConfigError, match=field):
        AutoencoderKLConfig.from_dict({**codec.preset("tiny").to_dict(), field: value})


@pytest.mark.parametrize("size", [(64, 48), (37, 53), (8, 8), (1, 1), (65, 63)])
def test_latent_shape_pads_up(tiny_config, size):
    height, width = size
    f = tiny_config.downsample_factor
    assert tiny_config.latent_shape(height, width) == (
        tiny_config.latent_channels,
        math.ceil(height / f),
        math.ceil(width / f),
    )


def test_latent_shape_examples(tiny_config):
    assert tiny_config.latent_shape(37, 53) == (4, 5, 7)
    assert tiny_config.latent_shape(64, 48) == (4, 8, 6)
    assert tiny_config.latent_shape(65, 48) == (4, 9, 6)


def test_a_diffusers_model_whose_config_has_keys_we_do_not_know_has_an_identity(tmp_path, diffusers_vae):
    import diffusers

    from codec.cache.identity import model_identity

    diffusers_vae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "a_newer_field": 1}))
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path)  # diffusers keeps the key in .config
    ours = codec.AutoencoderKL.from_pretrained(tmp_path)
    assert model_identity(theirs) == model_identity(ours)
