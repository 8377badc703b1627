"""What a single file does not say: settings we recorded, families told by other keys, guesses that must stay
guesses, and files of other autoencoders, each refused or warned about by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import codec
from codec import CheckpointError


def _bare(model: codec.AutoencoderKL, path):
    """The model as other tools write a VAE file: LDM tensors without our record of its settings."""
    ours = path.with_name("ours-" + path.name)
    model.save_single_file(ours)
    save_file(load_file(ours), str(path))
    return path


def test_groups_that_32_does_not_divide_are_read_back(tiny_config, tmp_path):
    # 48 channels in 8 groups: the file records 8, and the config must take it before it is validated.
    config = dataclasses.replace(tiny_config, block_out_channels=(16, 48, 48, 48), norm_num_groups=8)
    torch.manual_seed(0)
    model = codec.AutoencoderKL(config).eval()
    model.save_single_file(tmp_path / "vae.safetensors")
    loaded = codec.AutoencoderKL.from_single_file(tmp_path / "vae.safetensors")
    assert (loaded.config.block_out_channels, loaded.config.norm_num_groups) == ((16, 48, 48, 48), 8)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_guessed_scaling_factor_is_not_recorded_as_known(tiny_config, tmp_path, caplog):
    bare = _bare(codec.AutoencoderKL(tiny_config), tmp_path / "sdxl-vae.safetensors")  # SDXL's, say: who knows
    with caplog.at_level("WARNING"):
        guessed = codec.AutoencoderKL.from_single_file(bare)
    assert "does not record its scaling factor; assuming 0.18215" in caplog.text
    assert guessed.provenance.scaling_is_guess and guessed.scaling_is_guess
    guessed.save_single_file(tmp_path / "converted.safetensors")  # as `codec convert` does
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = codec.AutoencoderKL.from_single_file(tmp_path / "converted.safetensors")
    assert "does not record its scaling factor" in caplog.text  # still a guess, and still said
    assert again.config.norm_num_groups == 32  # what shapes cannot tell is still recorded
    told = dataclasses.replace(tiny_config, scaling_factor=0.13025)  # as config="sdxl" tells SDXL's VAE
    known = codec.AutoencoderKL.from_single_file(bare, config=told)  # recorded from here on
    known.save_single_file(tmp_path / "told.safetensors")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert codec.AutoencoderKL.from_single_file(tmp_path / "told.safetensors").config.scaling_factor == 0.13025
    assert "does not record" not in caplog.text


def test_convert_to_a_folder_says_the_guess_is_now_its_config(tiny_config, tmp_path, capsys):
    from codec.cli import main

    bare = _bare(codec.AutoencoderKL(tiny_config), tmp_path / "vae.safetensors")
    assert main(["convert", str(bare), str(tmp_path / "folder")]) == 0
    assert "folder/config.json holds scaling_factor 0.18215, the guess" in capsys.readouterr().out
    assert main(["convert", str(bare), str(tmp_path / "told"), "--config", "tiny"]) == 0  # told: nothing to say
    assert "guess" not in capsys.readouterr().out


def test_the_guess_for_sixteen_channels_points_at_sd3_not_sdxl(tiny_config, tmp_path, caplog):
    config = dataclasses.replace(tiny_config, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    bare = _bare(codec.AutoencoderKL(config), tmp_path / "ae.safetensors")
    with caplog.at_level("WARNING"):
        codec.AutoencoderKL.from_single_file(bare)
    assert "(FLUX; config='sd3' for SD3's VAE" in caplog.text and "sdxl" not in caplog.text


def test_a_playground_checkpoint_brings_its_latent_statistics(tiny_config, tmp_path):
    # Playground v2.5: SDXL's layout (conditioner.embedders) plus edm_mean/edm_std; diffusers scales by 0.5 and
    # takes those as latents_mean/std.
    bare = _bare(codec.AutoencoderKL(tiny_config), tmp_path / "vae.safetensors")
    whole = {f"first_stage_model.{key}": value for key, value in load_file(bare).items()}
    whole["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(2)
    whole["edm_mean"] = torch.tensor([-1.6574, 1.886, -1.383, 2.5155]).reshape(1, 4, 1, 1)
    whole["edm_std"] = torch.tensor([8.4927, 5.9022, 6.5498, 5.2299]).reshape(1, 4, 1, 1)
    save_file(whole, str(tmp_path / "playground.safetensors"))
    config = codec.AutoencoderKL.from_single_file(tmp_path / "playground.safetensors").config
    assert config.scaling_factor == 0.5
    assert config.latents_mean == pytest.approx((-1.6574, 1.886, -1.383, 2.5155))
    assert config.latents_std == pytest.approx((8.4927, 5.9022, 6.5498, 5.2299))


def test_tensors_of_a_bare_file_that_are_not_the_vaes_are_named(tiny_config, tmp_path, caplog):
    tensors = load_file(_bare(codec.AutoencoderKL(tiny_config), tmp_path / "vae.safetensors"))
    # Tensors of unknown meaning are named (FLUX.2's bn.* statistics are read: tests/test_flux2.py); LDM's training
    # leaves loss.* and model_ema.* (not worth a word).
    extra = {"stats.mean": torch.zeros(4), "stats.var": torch.ones(4), "loss.logvar": torch.zeros(())}
    save_file({**tensors, **extra}, str(tmp_path / "extra.safetensors"))
    with caplog.at_level("WARNING"):
        codec.AutoencoderKL.from_single_file(tmp_path / "extra.safetensors")
    assert "ignored 2 tensors that are not the VAE's: stats.mean, stats.var" in caplog.text
    # A whole checkpoint of a family we cannot tell: its other tensors are its other models, not worth a word.
    whole = {f"first_stage_model.{key}": value for key, value in tensors.items()}
    save_file({**whole, "model.diffusion_model.x.weight": torch.zeros(2)}, str(tmp_path / "whole.safetensors"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        codec.AutoencoderKL.from_single_file(tmp_path / "whole.safetensors")
    assert "does not record its scaling factor" in caplog.text and "ignored" not in caplog.text


def test_other_autoencoders_are_named(tiny_config, tmp_path):
    tensors = load_file(_bare(codec.AutoencoderKL(tiny_config), tmp_path / "vae.safetensors"))
    save_file({**tensors, "quantize.embedding.weight": torch.zeros(16, 4)}, str(tmp_path / "vq.safetensors"))
    with pytest.raises(CheckpointError, match=r"vq\.safetensors: a vector-quantised autoencoder \(VQModel"):
        codec.AutoencoderKL.from_single_file(tmp_path / "vq.safetensors")
    taesd = {"encoder.0.weight": torch.zeros(64, 3, 3, 3), "decoder.1.weight": torch.zeros(64, 4, 3, 3)}
    save_file(taesd, str(tmp_path / "taesd.safetensors"))
    with pytest.raises(CheckpointError, match=r"taesd\.safetensors: .*not an SD-style AutoencoderKL"):
        codec.AutoencoderKL.from_single_file(tmp_path / "taesd.safetensors")


def test_a_safetensors_file_cut_inside_its_header_is_called_one(tiny_config, tmp_path):
    path = tmp_path / "vae.sft"  # a name that does not say which format
    codec.AutoencoderKL(tiny_config).save_single_file(tmp_path / "vae.safetensors")
    path.write_bytes((tmp_path / "vae.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"vae\.sft: not a readable safetensors file, perhaps truncated"):
        codec.AutoencoderKL.from_single_file(path)
