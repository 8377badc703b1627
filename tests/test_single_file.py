"""Single-file (LDM layout) checkpoints: ours <-> diffusers' from_single_file, inferred configs, prefixes of whole
SD checkpoints, linear attention projections, .ckpt files, and config mismatches."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import codec
from codec import CheckpointError

ARCHITECTURE_FIELDS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture
def single_file(ours, tmp_path):
    path = tmp_path / "vae.safetensors"
    ours.save_single_file(path)
    return path


def _assert_same_architecture(config: codec.AutoencoderKLConfig, expected: codec.AutoencoderKLConfig) -> None:
    for field in ARCHITECTURE_FIELDS:
        assert getattr(config, field) == getattr(expected, field), field


def test_file_uses_ldm_keys(single_file, ours):
    tensors = load_file(single_file)
    assert len(tensors) == len(ours.state_dict())
    assert "encoder.down.0.block.0.conv1.weight" in tensors
    assert "decoder.up.3.block.0.conv1.weight" in tensors
    assert "encoder.mid.attn_1.q.weight" in tensors
    assert not any("down_blocks" in key or "mid_block" in key for key in tensors)
    assert tensors["encoder.mid.attn_1.q.weight"].dim() == 4  # 1x1 convs, as LDM stores them
    # LDM counts decoder levels from the lowest resolution: up.0 is the last block run, which has no upsampler.
    assert torch.equal(
        tensors["decoder.up.0.block.0.conv1.weight"], ours.state_dict()["decoder.up_blocks.3.resnets.0.conv1.weight"]
    )
    assert "decoder.up.0.upsample.conv.weight" not in tensors


def test_loads_in_diffusers_from_single_file(
    single_file, diffusers_folder, diffusers_vae, ours, x, assert_same_tensors
):
    import diffusers

    theirs = diffusers.AutoencoderKL.from_single_file(str(single_file), config=str(diffusers_folder)).eval()
    assert_same_tensors(theirs.state_dict(), ours.state_dict())
    with torch.no_grad():
        assert torch.equal(theirs(x).sample, diffusers_vae(x).sample)
        torch.testing.assert_close(ours(x).sample, theirs(x).sample, atol=1e-4, rtol=0)


def test_loads_in_ours_with_inferred_config(single_file, ours, tiny_config, x, assert_same_tensors):
    loaded = codec.AutoencoderKL.from_single_file(single_file)
    _assert_same_architecture(loaded.config, tiny_config)
    assert loaded.config.norm_num_groups == 32
    assert loaded.config.scaling_factor == 0.18215  # 4 latent channels with quant convs: the SD 1.x/2.x family
    assert not loaded.training
    assert_same_tensors(loaded.state_dict(), ours.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, ours(x).sample)


def test_explicit_config_is_used(single_file, ours, tiny_config, diffusers_folder, assert_same_tensors):
    custom = dataclasses.replace(tiny_config, scaling_factor=0.5)
    assert codec.AutoencoderKL.from_single_file(single_file, config=custom).config == custom
    from_folder = codec.AutoencoderKL.from_single_file(single_file, config=diffusers_folder)
    assert from_folder.config == tiny_config
    assert_same_tensors(from_folder.state_dict(), ours.state_dict())
    half = codec.AutoencoderKL.from_single_file(single_file, torch_dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_whole_sd_checkpoint_with_first_stage_model_prefix(
    single_file, ours, tiny_config, tmp_path, assert_same_tensors
):
    vae = load_file(single_file)
    checkpoint = {f"first_stage_model.{key}": value for key, value in vae.items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    checkpoint["model.diffusion_model.out.2.bias"] = torch.randn(4)
    checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(16)
    path = tmp_path / "sd-checkpoint.safetensors"
    save_file(checkpoint, str(path))
    loaded = codec.AutoencoderKL.from_single_file(path)
    _assert_same_architecture(loaded.config, tiny_config)
    assert_same_tensors(loaded.state_dict(), ours.state_dict())


def test_vae_prefix(single_file, ours, tmp_path, assert_same_tensors):
    path = tmp_path / "prefixed.safetensors"
    save_file({f"vae.{key}": value for key, value in load_file(single_file).items()}, str(path))
    assert_same_tensors(codec.AutoencoderKL.from_single_file(path).state_dict(), ours.state_dict())


def test_diffusers_layout_single_file(ours, tmp_path, assert_same_tensors):
    # Some tools save the diffusers state dict itself as one file, sometimes under a prefix.
    path = tmp_path / "diffusers-layout.safetensors"
    save_file({f"vae.{key}": value.contiguous() for key, value in ours.state_dict().items()}, str(path))
    assert_same_tensors(codec.AutoencoderKL.from_single_file(path).state_dict(), ours.state_dict())


def test_attention_projections_stored_as_linears(single_file, ours, tmp_path, assert_same_tensors):
    tensors = load_file(single_file)
    squeezed = 0
    for key, value in list(tensors.items()):
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            tensors[key] = value[:, :, 0, 0].contiguous()
            squeezed += 1
    assert squeezed == 8  # q, k, v, proj_out in the encoder and the decoder
    path = tmp_path / "linear-attention.safetensors"
    save_file(tensors, str(path))
    assert_same_tensors(codec.AutoencoderKL.from_single_file(path).state_dict(), ours.state_dict())


def test_ckpt_with_state_dict(single_file, ours, tmp_path, assert_same_tensors):
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": load_file(single_file), "global_step": 840000, "epoch": 3}, path)
    assert_same_tensors(codec.AutoencoderKL.from_single_file(path).state_dict(), ours.state_dict())

    whole = tmp_path / "model.ckpt"
    state = {f"first_stage_model.{key}": value for key, value in load_file(single_file).items()}
    state["model.diffusion_model.time_embed.0.weight"] = torch.randn(8, 4)
    torch.save({"state_dict": state}, whole)
    assert_same_tensors(codec.AutoencoderKL.from_single_file(whole).state_dict(), ours.state_dict())


def test_save_single_file_ckpt_round_trip(ours, tmp_path, assert_same_tensors):
    path = tmp_path / "vae.ckpt"
    ours.save_single_file(path)
    data = torch.load(path, weights_only=True)
    assert "encoder.down.0.block.0.conv1.weight" in data["state_dict"]
    assert_same_tensors(codec.AutoencoderKL.from_single_file(path).state_dict(), ours.state_dict())
    with pytest.raises(CheckpointError, match="unknown single-file format"):
        ours.save_single_file(tmp_path / "vae.onnx")


def test_wrong_config_lists_shape_mismatches(single_file):
    with pytest.raises(CheckpointError) as info:
        codec.AutoencoderKL.from_single_file(single_file, config="sdxl")
    message = str(info.value)
    assert str(single_file) in message
    assert re.search(r"shape mismatches \(\d+\)", message)
    assert "decoder.conv_in.weight (64, 4, 3, 3) vs model (512, 4, 3, 3)" in message
    assert "missing keys" in message  # sdxl has two resnets per encoder block where tiny has one


def test_file_without_vae_weights(tmp_path):
    path = tmp_path / "unet-only.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError) as info:
        codec.AutoencoderKL.from_single_file(path)
    assert str(path) in str(info.value) and "no VAE weights" in str(info.value)


def test_truncated_single_file(single_file):
    data = single_file.read_bytes()
    single_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        codec.AutoencoderKL.from_single_file(single_file)
    assert str(single_file) in str(info.value)


def test_sixteen_channels_without_quant_convs_round_trip(tiny_config, tmp_path, x, assert_same_tensors):
    config = dataclasses.replace(
        tiny_config,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    torch.manual_seed(0)
    model = codec.AutoencoderKL(config).eval()
    path = tmp_path / "flux-like.safetensors"
    model.save_single_file(path)
    assert not any("quant_conv" in key for key in load_file(path))
    loaded = codec.AutoencoderKL.from_single_file(path)
    assert loaded.config.latent_channels == 16
    assert loaded.config.use_quant_conv is False and loaded.config.use_post_quant_conv is False
    assert loaded.quant_conv is None and loaded.post_quant_conv is None
    assert loaded.config.shift_factor == 0.1159  # 16 channels without quant convs: the FLUX family
    _assert_same_architecture(loaded.config, config)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, model(x).sample)


@pytest.mark.parametrize(
    ("marker", "family", "latent_channels"),
    [
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd", 4),
        ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_fc.weight", "sdxl", 4),
        ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "sd3", 16),
        ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "flux", 16),
    ],
)
def test_a_whole_checkpoint_names_its_family_and_so_its_scaling_factor(
    marker, family, latent_channels, tiny_config, tmp_path, caplog
):
    # SDXL's VAE has SD 1.x's shapes, SD3's has FLUX's: only the rest of a whole checkpoint tells them apart.
    config = dataclasses.replace(
        tiny_config,
        latent_channels=latent_channels,
        use_quant_conv=latent_channels == 4,
        use_post_quant_conv=latent_channels == 4,
    )
    ours_file = tmp_path / "ours.safetensors"
    codec.AutoencoderKL(config).save_single_file(ours_file)
    bare = tmp_path / "bare.safetensors"  # as other tools write a VAE: tensors, no record of its settings
    save_file(load_file(ours_file), str(bare))
    whole = {f"first_stage_model.{key}": value for key, value in load_file(bare).items()}
    whole[marker] = torch.zeros(2)
    path = tmp_path / "whole.safetensors"
    save_file(whole, str(path))
    with caplog.at_level("WARNING"):
        loaded = codec.AutoencoderKL.from_single_file(path)
    expected = codec.preset(family)
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (
        expected.scaling_factor,
        expected.shift_factor,
    )
    assert "does not record its scaling factor" not in caplog.text
    with caplog.at_level("WARNING"):
        codec.AutoencoderKL.from_single_file(bare)  # a bare VAE file: a guess, and it says so
    assert "does not record its scaling factor" in caplog.text


def _stand_in_class(module: str, name: str, monkeypatch) -> type:
    """A class pickled under `module.name` as though that package were installed, then forgotten."""
    import sys
    import types

    cls = type(name, (), {"__module__": module, "__qualname__": name})
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module], name, cls)
    return cls


def test_lightning_checkpoints_load_and_a_pickle_that_could_run_code_is_refused(
    single_file, ours, tmp_path, monkeypatch
):
    np = pytest.importorskip("numpy")
    import sys

    state = load_file(single_file)
    checkpoint_class = _stand_in_class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint", monkeypatch)
    payload = _stand_in_class("someone.payload", "Runner", monkeypatch)
    this_loaded = "this" in sys.modules  # `import this` prints the Zen of Python: a visible side effect
    zen = _stand_in_class("this.payload", "Zen", monkeypatch)
    torch.save({"state_dict": state, "extra": zen()}, tmp_path / "zen.ckpt", _use_new_zipfile_serialization=False)
    lightning = {"state_dict": state, "global_step": np.int64(470000), "callbacks": {checkpoint_class: {"best": None}}}
    for zipped in (True, False):  # torch's zip format, and the legacy one (torch < 1.6), named one global at a time
        torch.save(lightning, tmp_path / f"lightning-{zipped}.ckpt", _use_new_zipfile_serialization=zipped)
        hostile = {"state_dict": state, "extra": payload()}
        torch.save(hostile, tmp_path / f"hostile-{zipped}.ckpt", _use_new_zipfile_serialization=zipped)
    for module in [m for m in sys.modules if m.startswith(("pytorch_lightning", "someone", "this"))]:
        monkeypatch.delitem(sys.modules, module)  # loading must not need them

    torch.save({"state_dict": state, "extra": _Calls()}, tmp_path / "calls.ckpt", _use_new_zipfile_serialization=False)
    for zipped in (True, False):
        loaded = codec.AutoencoderKL.from_single_file(tmp_path / f"lightning-{zipped}.ckpt")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(CheckpointError, match=r"hostile-True\.ckpt: holds pickled objects .* someone\.payload\.Run"):
        codec.AutoencoderKL.from_single_file(tmp_path / "hostile-True.ckpt")
    with pytest.raises(CheckpointError, match=r"calls\.ckpt: holds pickled objects .*could run code: posix\.getcwd"):
        codec.AutoencoderKL.from_single_file(tmp_path / "calls.ckpt")
    # The legacy format names one global at a time, from the bytes it read: a file cut short names fragments
    # ("torch.FloatStor") of loaded modules, called damage; a module not loaded here counts as code.
    with pytest.raises(CheckpointError, match=r"hostile-False\.ckpt: holds pickled objects .* someone\.payload\.Run"):
        codec.AutoencoderKL.from_single_file(tmp_path / "hostile-False.ckpt")
    with pytest.raises(CheckpointError, match=r"zen\.ckpt: holds pickled objects .* this\.payload\.Zen"):
        codec.AutoencoderKL.from_single_file(tmp_path / "zen.ckpt")
    assert this_loaded or "this" not in sys.modules  # an installed package the file names is never imported
    whole = (tmp_path / "lightning-False.ckpt").read_bytes()
    for cut in range(200, 1400, 37):
        (tmp_path / "truncated.ckpt").write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint, perhaps trunc") as info:
            codec.AutoencoderKL.from_single_file(tmp_path / "truncated.ckpt")
        assert "weights_only" not in str(info.value) and "\x1b" not in str(info.value)  # none of torch's advice


class _Calls:
    """Unpickles by calling a function (os.getcwd: harmless, but a call is what a payload makes)."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_a_path_starting_with_a_tilde_is_the_home_folder(ours, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ours.save_pretrained(tmp_path / "vae-folder")
    ours.save_single_file(tmp_path / "vae.safetensors")
    for spec in ("~/vae-folder", "~/vae.safetensors"):
        assert torch.equal(codec.AutoencoderKL.load(spec).encoder.conv_in.weight, ours.encoder.conv_in.weight), spec
    assert codec.AutoencoderKL.from_pretrained("~/vae-folder").config == ours.config
    assert codec.AutoencoderKL.from_single_file("~/vae.safetensors").config.block_out_channels == (32, 64, 64, 64)


def test_a_safetensors_file_is_known_by_its_content_not_its_name(single_file, ours, tmp_path):
    for name in ("ae.sft", "VAE.SAFETENSORS"):  # FLUX's autoencoder shipped as ae.sft
        path = tmp_path / name
        path.write_bytes(single_file.read_bytes())
        loaded = codec.AutoencoderKL.load(path)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items()), name


def test_our_single_files_keep_the_settings_shapes_cannot_tell(tiny_config, tmp_path, caplog):
    config = dataclasses.replace(tiny_config, scaling_factor=0.13025, latents_mean=(0.1, 0.2, 0.3, 0.4), sample_size=96)
    path = tmp_path / "sdxl-like.safetensors"
    codec.AutoencoderKL(config).save_single_file(path)
    with caplog.at_level("WARNING"):
        loaded = codec.AutoencoderKL.from_single_file(path)
    assert "does not record" not in caplog.text
    assert (loaded.config.scaling_factor, loaded.config.latents_mean, loaded.config.sample_size) == (
        0.13025,
        (0.1, 0.2, 0.3, 0.4),
        96,
    )
    # diffusers reads these files as before: test_loads_in_diffusers_from_single_file uses one of them.

    # A record edited into other JSON (a list, a number) is no record: the file loads on what its shapes say.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    for text in ("[1, 2]", "7"):
        save_file(tensors, str(path), metadata={"latent_codec_settings": text})
        assert codec.AutoencoderKL.from_single_file(path).config.scaling_factor == 0.18215


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_model_with_other_than_32_groups_survives_a_single_file(suffix, tiny_config, tmp_path, x, caplog):
    # The embedded codec normalises in 8 groups: read back as 32, it ran without error and lost 7 dB.
    config = dataclasses.replace(tiny_config, norm_num_groups=8, scaling_factor=0.377)
    torch.manual_seed(0)
    model = codec.AutoencoderKL(config).eval()
    path = tmp_path / f"eight-groups{suffix}"
    with caplog.at_level("WARNING"):
        model.save_single_file(path)
    assert "assume 32" in caplog.text  # other tools will not read the record
    loaded = codec.AutoencoderKL.from_single_file(path)
    assert (loaded.config.norm_num_groups, loaded.config.scaling_factor) == (8, 0.377)
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, model(x).sample)


_PEAK_WHILE_LOADING = """
import resource, sys, torch, codec
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
codec.AutoencoderKL.from_single_file(sys.argv[1])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_only_the_vae_of_a_whole_checkpoint_is_read(suffix, single_file, ours, tmp_path, assert_same_tensors):
    # A1111 users point at 2-7 GB model files; the VAE is a small part, and the rest must not pass through memory.
    from codec.checkpoint import read_checkpoint

    whole = {f"first_stage_model.{key}": value for key, value in load_file(single_file).items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.ones(32, 1024, 1024)  # 128 MiB: twice the bound
    whole["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(16)
    path = tmp_path / f"whole{suffix}"
    if suffix == ".safetensors":
        save_file(whole, str(path))
    else:
        torch.save({"state_dict": whole}, path)
    del whole

    checkpoint = read_checkpoint(path, keep=lambda name: name.startswith("first_stage_model."))
    assert "model.diffusion_model.input_blocks.0.0.weight" in checkpoint.names
    assert all(name.startswith("first_stage_model.") for name in checkpoint.tensors)
    assert len(checkpoint.tensors) == len(ours.state_dict())
    assert_same_tensors(codec.AutoencoderKL.from_single_file(path).state_dict(), ours.state_dict())

    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _PEAK_WHILE_LOADING, str(path)], capture_output=True, text=True, check=True
    )
    assert int(result.stdout.split()[-1]) < 64, f"peak rose by {result.stdout.split()[-1]} MiB while loading"


def test_an_upper_case_suffix_is_the_same_format(ours, tmp_path, assert_same_tensors):
    path = tmp_path / "VAE.SAFETENSORS"  # as some file systems and downloads spell it
    ours.save_single_file(path)
    assert_same_tensors(codec.AutoencoderKL.from_single_file(path).state_dict(), ours.state_dict())
