"""What code written against diffusers' AutoencoderKL touches besides encode and decode: pipelines, accelerate's
offload hooks, dict-style config reads, from_config / register_to_config, and the loader's and saver's flags."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import codec
from codec.config import ConfigError


def test_a_diffusers_pipeline_runs_with_our_vae_as_with_its_own(ours, diffusers_vae):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(2)
    transformer = DiTTransformer2DModel(
        sample_size=4, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    ).eval()  # fmt: skip
    images = []
    for vae in (ours, diffusers_vae):
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images.append(pipe(class_labels=[1, 2], num_inference_steps=2, generator=generator, output_type="np").images)
    assert images[0].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)


def test_accelerate_offload_hooks_run_for_encode_and_decode(ours, images):
    import accelerate
    from accelerate.hooks import ModelHook, add_hook_to_module

    with torch.no_grad():
        mean = ours.encode(images).latent_dist.mean
        decoded = ours.decode(mean).sample

    calls = []

    class Spy(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    spied = add_hook_to_module(copy.deepcopy(ours), Spy())
    with torch.no_grad():
        spied.encode(images)
        spied.decode(mean)
    assert len(calls) == 2  # a pipeline's enable_model_cpu_offload moves the model in through this hook

    # enable_sequential_cpu_offload: weights on the meta device, brought in layer by layer.
    offloaded = copy.deepcopy(ours)
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.offloaded and offloaded.device == torch.device("cpu")
    with torch.no_grad():
        torch.testing.assert_close(offloaded.encode(images).latent_dist.mean, mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(offloaded.decode(mean).sample, decoded, atol=1e-4, rtol=0)
        offloaded.enable_tiling(2)
        with pytest.warns(UserWarning, match="run untiled"):
            torch.testing.assert_close(offloaded.decode(mean).sample, decoded, atol=1e-4, rtol=0)


def test_the_config_reads_like_diffusers_frozen_dict(ours, diffusers_vae):
    config = ours.config
    assert config["scaling_factor"] == config.scaling_factor and "shift_factor" in config and "foo" not in config
    assert config.get("latents_mean") is None and config.get("foo", 5) == 5
    with pytest.raises(KeyError):
        config["foo"]
    assert dict(config) == dict(config.items()) and list(config) == list(config.to_dict())
    theirs = {key: value for key, value in diffusers_vae.config.items() if not key.startswith("_")}
    assert {key: dict(config)[key] for key in theirs} == {
        key: tuple(value) if isinstance(value, list) else value for key, value in theirs.items()
    }


def test_from_config_and_register_to_config(ours, diffusers_vae):
    fresh = codec.AutoencoderKL.from_config(diffusers_vae.config)  # diffusers' FrozenDict, bookkeeping keys too
    fresh.load_state_dict(diffusers_vae.state_dict())  # same architecture: every key and shape
    assert codec.AutoencoderKL.from_config(ours.config).config == ours.config

    model = copy.deepcopy(ours)
    model.register_to_config(scaling_factor=0.5, force_upcast=False)
    assert (model.config.scaling_factor, model.config.force_upcast) == (0.5, False)
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(model.scale_latents(z), z * 0.5)
    with pytest.raises(ConfigError, match="would change the architecture"):
        model.register_to_config(norm_num_groups=4)
    with pytest.raises(TypeError, match="scaling_facter"):
        model.register_to_config(scaling_facter=0.5)
    model.register_to_config(latent_channels=4, block_out_channels=list(ours.config.block_out_channels))  # unchanged
    extended = {**dict(diffusers_vae.config), "a_key_from_a_newer_diffusers": 1}
    assert codec.AutoencoderKL.from_config(extended).config == fresh.config  # ignored with a warning


def test_from_pretrained_and_save_pretrained_take_diffusers_arguments(ours, diffusers_folder, tmp_path):
    loaded = codec.AutoencoderKL.from_pretrained(
        pretrained_model_name_or_path=diffusers_folder, force_upcast=False, use_safetensors=True,
        low_cpu_mem_usage=True, local_files_only=True,
    )  # fmt: skip
    assert loaded.config.force_upcast is False and loaded.config.scaling_factor == ours.config.scaling_factor
    with pytest.raises(TypeError, match="forse_upcast"):  # before loading: no download for a typo
        codec.AutoencoderKL.from_pretrained("owner/not-on-any-hub", forse_upcast=False)

    loaded.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()  # a training script's other ranks write nothing
    with pytest.raises(ValueError, match="safetensors only"):
        loaded.save_pretrained(tmp_path / "bin", safe_serialization=False)
    loaded.save_pretrained(tmp_path / "main", safe_serialization=True, is_main_process=True)
    assert codec.AutoencoderKL.from_pretrained(tmp_path / "main").config.force_upcast is False


def test_tile_sizes_by_diffusers_names_and_xformers_switches(ours):
    ours.enable_tiling()
    ours.tile_sample_min_size = 256
    assert ours.tile_latent_size == 32 and ours.tile_latent_min_size == 32 and ours.tile_sample_min_size == 256
    ours.tile_latent_min_size = 16
    assert ours.tile_sample_min_size == 128
    with pytest.raises(ValueError, match="tile_sample_min_size must be a whole number of pixels >= 16, got 8"):
        ours.tile_sample_min_size = 8  # one latent position: named in the unit it was given in
    with pytest.raises(ValueError, match="tile_latent_min_size must be a whole number of latent pixels >= 2, got 1"):
        ours.tile_latent_min_size = 1
    ours.enable_xformers_memory_efficient_attention()  # SDPA already: accepted, changes nothing
    ours.set_use_memory_efficient_attention_xformers(True)
    ours.disable_xformers_memory_efficient_attention()
    output = ours.encode(torch.zeros(1, 3, 16, 16))
    assert output.keys() == ["latent_dist"] and dict(output.items())["latent_dist"] is output.latent_dist
