"""training.config: typed sections, YAML files, `section.key=value` overrides, errors that name the culprit, round trip."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from training.config import (
    SHIPPED_CONFIGS,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    save_config,
    to_yaml,
)

MINIMAL = ("model.preset=tiny", "data.train=photos")
SHIPPED = ("builtin", "builtin-continue", "builtin-large", "finetune-sd-decoder", "tiny", "train-kl-f8")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    LossConfig(), OptimizerConfig(), RunConfig()  # no required fields, and the defaults pass validation
    config = load_config(None, MINIMAL)
    assert config == TrainConfig(ModelConfig(preset="tiny"), DataConfig(train="photos"))
    assert config.loss == LossConfig() and config.optimizer.betas == (0.5, 0.9) and config.run.max_steps == 1000


def test_shipped_configs_are_all_tested():
    assert sorted(path.stem for path in SHIPPED_CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_by_path_and_by_name(name):
    assert load_config(SHIPPED_CONFIGS / f"{name}.yaml") == load_config(name)


def test_builtin_trains_the_embedded_architecture_on_the_prepared_photos():
    config = load_config("builtin")
    assert config.model.config == "training/configs/builtin.json"
    assert (config.data.train, config.data.validation) == ("data/train", "data/val")
    assert config.loss.lpips_weight == 0.0 and config.run.mixed_precision == "no"
    assert config.optimizer.ema_decay is not None


def test_builtin_large_keeps_the_builtin_recipe_on_a_model_that_fits_the_package():
    from training.model import build_autoencoder

    small, large = load_config("builtin"), load_config("builtin-large")
    assert (large.data.train, large.data.validation, large.data.resolution) == ("data/train", "data/val", 128)
    assert large.loss == small.loss and large.model.init_logvar == small.model.init_logvar
    assert large.run.mixed_precision == "bf16" and large.optimizer.ema_decay is not None
    vae = build_autoencoder(large.model)
    assert vae.config.latent_channels == 4 and vae.config.downsample_factor == 8
    assert 2 * sum(p.numel() for p in vae.parameters()) <= 20e6  # fp16 bytes: the embedded model stays under 20 MB


def test_builtin_continue_resumes_builtin_large_from_weights_with_a_gentler_restart():
    large, continued = load_config("builtin-large"), load_config("builtin-continue")
    assert continued.model.init and continued.model.config is None and continued.model.init_logvar is None
    assert not continued.model.decoder_only  # the encoder trains too: the scaling factor is measured again
    assert (continued.data, continued.loss) == (large.data, large.loss)
    assert (continued.run.batch_size, continued.run.mixed_precision) == (large.run.batch_size, "bf16")
    assert continued.optimizer.schedule == "cosine" and continued.optimizer.warmup_steps > 0
    assert continued.optimizer.lr < large.optimizer.lr and continued.run.seed != large.run.seed


def test_finetune_sd_decoder_is_the_ft_mse_recipe():
    config = load_config(SHIPPED_CONFIGS / "finetune-sd-decoder.yaml")
    assert config.model == ModelConfig(init="stabilityai/sd-vae-ft-ema", decoder_only=True)
    loss = config.loss
    assert (loss.pixel, loss.pixel_weight, loss.lpips_weight, loss.kl_weight) == ("l2", 1.0, 0.1, 0.0)
    assert loss.disc_start is None
    opt = config.optimizer
    assert (opt.lr, opt.betas, opt.ema_decay, opt.scale_lr) == (1e-5, (0.9, 0.999), 0.9999, False)
    assert config.data.resolution == 256
    assert (config.run.max_steps, config.run.mixed_precision) == (280000, "bf16")


def test_train_kl_f8_is_the_ldm_recipe():
    config = load_config(SHIPPED_CONFIGS / "train-kl-f8.yaml")
    assert config.model == ModelConfig(preset="sd")
    loss = config.loss
    assert (loss.pixel, loss.lpips_weight, loss.kl_weight) == ("l1", 1.0, 1e-6)
    assert (loss.disc_start, loss.disc_weight, loss.disc_layers, loss.adaptive_disc_weight) == (50001, 0.5, 3, True)
    opt = config.optimizer
    assert (opt.lr, opt.scale_lr, opt.betas) == (4.5e-6, True, (0.5, 0.9))
    assert config.data.resolution == 256
    # LDM: base lr x batch 12 x accumulation 2 x GPUs, for the discriminator too.
    assert config.learning_rates(num_processes=2) == pytest.approx((4.5e-6 * 48, 4.5e-6 * 48))


def test_tiny_is_a_short_offline_run():
    config = load_config(SHIPPED_CONFIGS / "tiny.yaml")
    assert config.model == ModelConfig(preset="tiny")
    assert (config.data.train, config.data.resolution, config.data.num_workers) == ("tests/data/photos", 64, 0)
    assert config.loss.lpips_weight == 0.0
    run = config.run
    assert (run.batch_size, run.max_steps, run.checkpoint_every, run.validate_every) == (2, 6, 3, 3)
    assert (run.log_with, run.output_dir) == (None, "runs/tiny")


def test_overrides_of_every_value_kind():
    config = load_config(
        SHIPPED_CONFIGS / "tiny.yaml",
        [
            "run.max_steps=7",
            "optimizer.lr=2e-4",  # YAML 1.1 would read this as a string; our loader reads a float
            "optimizer.weight_decay=1",  # an int where a float is expected
            "model.decoder_only=true",
            "run.log_with=tensorboard",
            "loss.disc_start=null",
            "optimizer.ema_decay=0.999",
            "optimizer.betas=[0.9, 0.99]",
            "data.train=other folder/images",
            "run.resume=true",
        ],
    )
    assert config.run.max_steps == 7 and config.optimizer.lr == 2e-4
    assert config.optimizer.weight_decay == 1.0 and isinstance(config.optimizer.weight_decay, float)
    assert config.model.decoder_only is True and config.run.log_with == "tensorboard"
    assert config.loss.disc_start is None and config.optimizer.ema_decay == 0.999
    assert config.optimizer.betas == (0.9, 0.99) and config.data.train == "other folder/images"
    assert config.run.resume is True
    assert load_config("tiny", ["run.resume=runs/tiny/checkpoint-3"]).run.resume == "runs/tiny/checkpoint-3"
    # Later overrides win, and one override can switch the model source when the other is cleared.
    assert load_config("tiny", ["run.seed=1", "run.seed=2"]).run.seed == 2
    switched = load_config("tiny", ["model.preset=null", "model.init=stabilityai/sd-vae-ft-mse"])
    assert switched.model == ModelConfig(init="stabilityai/sd-vae-ft-mse")


def test_apply_overrides_returns_a_new_config():
    config = load_config("tiny")
    changed = apply_overrides(config, ["run.max_steps=9", "loss.pixel=l2"])
    assert (changed.run.max_steps, changed.loss.pixel) == (9, "l2")
    assert config.run.max_steps == 6 and dataclasses.replace(changed.run, max_steps=6) == config.run


def test_keep_checkpoints_also_loads_under_its_earlier_name(tmp_path):
    assert load_config("tiny").run.keep_checkpoints == 3
    earlier_run = write(tmp_path, "model:\n  preset: tiny\ndata:\n  train: x\nrun:\n  checkpoints_to_keep: 5\n")
    assert load_config(earlier_run).run.keep_checkpoints == 5
    assert load_config("tiny", ["run.checkpoints_to_keep=4"]).run.keep_checkpoints == 4
    with pytest.raises(ConfigError, match=r"run\.keep_checkpoints must be at least 1"):
        load_config("tiny", ["run.keep_checkpoints=0"])


def test_unknown_key_in_yaml_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny\ndata:\n  train: x\nrun:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"config\.yaml.*run\.max_step\b.*did you mean 'max_steps'"):
        load_config(path)


def test_unknown_key_in_override_names_override_and_suggestion():
    with pytest.raises(ConfigError, match=r"override 'run\.max_step=3'.*did you mean 'max_steps'"):
        load_config("tiny", ["run.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown key loss\.zzz; known: pixel, pixel_weight"):
        load_config("tiny", ["loss.zzz=1"])


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'optimiser'.*did you mean 'optimizer'"):
        load_config("tiny", ["optimiser.lr=1"])
    with pytest.raises(ConfigError, match=r"config\.yaml: unknown section 'trainer'"):
        load_config(write(tmp_path, "trainer:\n  max_steps: 3\n"))


@pytest.mark.parametrize("override", ["run.max_steps", "max_steps=3", "=3", "run.=3", "run.max_steps.x=3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="malformed override"):
        load_config("tiny", [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.max_steps=abc", "run.max_steps: expected int, got str 'abc'"),
        ("run.max_steps=1.5", "run.max_steps: expected int"),
        ("run.max_steps=true", "run.max_steps: expected int, got True"),
        ("optimizer.lr=fast", "optimizer.lr: expected float"),
        ("optimizer.betas=[0.9]", "optimizer.betas: expected a list of 2 values"),
        ("optimizer.betas=[0.9, x]", r"optimizer.betas\[1\]: expected float"),
        ("optimizer.ema_decay=high", "optimizer.ema_decay: expected float | None"),
        ("model.decoder_only=1", "model.decoder_only: expected bool"),
        ("data.train=5", "data.train: expected str"),
        ("run.resume=3", r"run.resume: expected bool \| str"),
    ],
)
def test_wrong_types_are_rejected(override, message):
    with pytest.raises(ConfigError, match=rf"override '{re.escape(override)}'.*{message}"):
        load_config("tiny", [override])


def test_wrong_type_in_yaml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.yaml: data\.resolution: expected int, got str"):
        load_config(write(tmp_path, "model: {preset: tiny}\ndata: {train: x, resolution: big}\n"))


def test_wrong_type_in_python_is_rejected():
    with pytest.raises(ConfigError, match=r"run\.max_steps: expected int"):
        RunConfig(max_steps="5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="model: expected a ModelConfig"):
        TrainConfig(model={"preset": "tiny"}, data=DataConfig(train="x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.pixel=l3", r"loss.pixel: must be one of 'l1', 'l2', got 'l3'"),
        ("loss.lpips_net=resnet", "loss.lpips_net: must be one of 'vgg', 'alex'"),
        ("optimizer.schedule=step", "optimizer.schedule: must be one of"),
        ("run.mixed_precision=fp8", "run.mixed_precision: must be one of 'no', 'fp16', 'bf16'"),
        ("run.mixed_precision=no", "got False .quote the word"),  # YAML 1.1 reads an unquoted no as false
    ],
)
def test_invalid_literal_is_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])
    assert load_config("tiny", ["run.mixed_precision='no'"]).run.mixed_precision == "no"


@pytest.mark.parametrize(
    ("overrides", "given"),
    [
        (["model.init=stabilityai/sd-vae-ft-mse"], "init and preset"),
        (["model.config=vae/config.json"], "preset and config"),
        (["model.preset=null"], "none"),
    ],
)
def test_exactly_one_model_source(overrides, given):
    with pytest.raises(ConfigError, match=rf"exactly one of model.init .*got {given}"):
        load_config("tiny", overrides)
    with pytest.raises(ConfigError, match="exactly one of"):
        ModelConfig()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.preset=sd9", "model.preset: unknown preset 'sd9'"),
        ("model.preset=''", "model.preset must not be empty"),
        ("optimizer.lr=0", "optimizer.lr must be > 0, got 0.0"),
        ("optimizer.betas=[0.9, 1.0]", r"optimizer.betas must both be in \[0, 1\)"),
        ("optimizer.ema_decay=1", r"optimizer.ema_decay must be in \(0, 1\)"),
        ("run.batch_size=0", "run.batch_size must be at least 1"),
        ("loss.kl_weight=-1", "loss.kl_weight must be >= 0"),
        ("data.resolution=60", "data.resolution must be a positive multiple of 8"),
        ("data.validation_fraction=1", r"data.validation_fraction must be in \[0, 1\)"),
    ],
)
def test_invalid_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_cross_field_errors_name_their_sources():
    with pytest.raises(ConfigError, match=r"tiny\.yaml, override 'data.validation=v'.*not both"):
        load_config("tiny", ["data.validation=v", "data.validation_fraction=0.1"])
    with pytest.raises(ConfigError, match=r"data\.train is required"):
        load_config(None, ["model.preset=tiny"])
    with pytest.raises(ConfigError, match="pixel_weight and lpips_weight are both 0"):
        load_config("tiny", ["loss.pixel_weight=0"])


@pytest.mark.parametrize("text", ["- a\n- b\n", "model: [1, 2]\n", "model: {preset: tiny\n"])
def test_malformed_yaml(tmp_path, text):
    with pytest.raises(ConfigError, match=r"config\.yaml"):
        load_config(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match=r"no-such\.yaml: cannot read"):
        load_config("no-such.yaml")
    with pytest.raises(
        ConfigError, match=r"tinny: cannot read the config.*shipped configs: .*finetune-sd-decoder, tiny"
    ):
        load_config("tinny")  # a mistyped name: the names that exist


@pytest.mark.parametrize("name", SHIPPED)
def test_save_load_round_trip(tmp_path, name):
    config = load_config(name)
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert path.read_text() == to_yaml(config) and list(path.parent.iterdir()) == [path]  # no temporary left


def test_round_trip_keeps_awkward_values(tmp_path):
    config = load_config(
        "tiny",
        [
            "data.train='1e5'",  # a string that our loader would read as a float if the dumper did not quote it
            "data.validation='null'",
            "run.output_dir='yes'",
            "run.resume='true'",  # a checkpoint path named true, not the flag
            "optimizer.betas=[0.5, 0.999]",
            "optimizer.lr=1.2345678901234567e-07",
            "run.mixed_precision='no'",
        ],
    )
    assert (config.data.train, config.data.validation, config.run.resume) == ("1e5", "null", "true")
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_shipped_configs_find_repository_paths_from_any_folder(tmp_path, monkeypatch):
    repository = SHIPPED_CONFIGS.parent.parent
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").data.train == str(repository / "tests" / "data" / "photos")
    assert load_config("builtin").model.config == str(repository / "training" / "configs" / "builtin.json")
    assert load_config("tiny").run.output_dir == "runs/tiny"  # outputs stay where the user is
    (tmp_path / "tests" / "data" / "photos").mkdir(parents=True)  # a path that exists here wins
    assert load_config("tiny").data.train == "tests/data/photos"
    own = tmp_path / "mine.yaml"  # the user's own config: relative to the working folder, as written
    own.write_text("model:\n  config: training/configs/builtin.json\ndata:\n  train: photos\n")
    assert (load_config(own).model.config, load_config(own).data.train) == ("training/configs/builtin.json", "photos")


def test_the_command_line_says_what_is_wrong_with_the_data_in_one_line(tmp_path, capsys):
    from training.__main__ import main

    code = main(["--config", "tiny", f"data.train={tmp_path / 'missing'}", f"run.output_dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("training: error: ") and "missing" in error
    assert "Traceback" not in error
