"""FLUX.2's VAE (diffusers' AutoencoderKLFlux2): parity with diffusers on seeded random weights, the Flux2
pipeline's patchified, batch-normalised latents, config and weight files, tiling and half precision."""

from __future__ import annotations

import json
import types

import pytest
import torch

import codec
from codec import latent_norm
from codec.config import FLUX2_KEYS, ConfigError

ATOL = 1e-4


def _diffusers_kwargs(config: codec.AutoencoderKLConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k in FLUX2_KEYS and k != "force_upcast"}


@pytest.fixture(scope="module")
def flux2_diffusers():
    """diffusers' AutoencoderKLFlux2 with the flux2-tiny preset's sizes (an asymmetric decoder), seeded weights and
    batch-norm statistics that are not the identity (as trained ones are not)."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLFlux2(**_diffusers_kwargs(codec.preset("flux2-tiny"))).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features, generator=generator) * 0.5)
        vae.bn.running_var.copy_(torch.rand(vae.bn.num_features, generator=generator) * 2 + 0.2)
    return vae


@pytest.fixture(scope="module")
def flux2_folder(tmp_path_factory, flux2_diffusers):
    folder = tmp_path_factory.mktemp("flux2_vae")
    flux2_diffusers.save_pretrained(folder)
    return folder


@pytest.fixture
def flux2_ours(flux2_folder) -> codec.AutoencoderKL:
    return codec.AutoencoderKL.from_pretrained(flux2_folder)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1234)) * 2 - 1


def _close(name: str, a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    diff = (a.double() - b.double()).abs().max().item()
    print(f"flux2 parity {name}: max abs diff {diff:.3g}")
    assert a.shape == b.shape and diff < atol, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}, max abs diff {diff}"


def test_a_diffusers_folder_loads_and_encodes_and_decodes_as_diffusers(flux2_ours, flux2_diffusers, images):
    assert flux2_ours.config.latent_channels == 8 and flux2_ours.config.patch_size == (2, 2)
    assert flux2_ours.config.decoder_block_out_channels == (32, 32, 64, 64)  # narrower than the encoder
    with torch.no_grad():
        mine, theirs = flux2_ours.encode(images).latent_dist, flux2_diffusers.encode(images).latent_dist
        _close("mean", mine.mean, theirs.mean)
        _close("logvar", mine.logvar, theirs.logvar)
        _close("decode", flux2_ours.decode(theirs.mode()).sample, flux2_diffusers.decode(theirs.mode()).sample)
        _close("forward", flux2_ours(images).sample, flux2_diffusers(images).sample)
    torch.testing.assert_close(flux2_ours.bn.running_var, flux2_diffusers.bn.running_var, rtol=0, atol=0)


def test_encode_latents_are_the_flux2_pipelines_and_decode_latents_inverts_them(flux2_ours, flux2_diffusers, images):
    pytest.importorskip("transformers")  # the pipeline's module imports it
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    # The pipeline's own method, on an object holding what it reads: its VAE and its patchify.
    pipeline = types.SimpleNamespace(vae=flux2_diffusers, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        expected = Flux2Pipeline._encode_vae_image(pipeline, images, generator=None)
        latents = flux2_ours.encode_latents(images)
        _close("encode_latents", latents, expected)
        assert latents.shape == (2, 32, 4, 3)  # 8 channels x 2x2 patches, at 1/16 of the image
        # The pipeline's decode: undo the batch norm, unpatchify, decode (pipeline_flux2.py, output_type != latent).
        bn = flux2_diffusers.bn
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + flux2_diffusers.config.batch_norm_eps)
        raw = Flux2Pipeline._unpatchify_latents(expected * std + bn.running_mean.view(1, -1, 1, 1))
        _close("unscale_latents", flux2_ours.unscale_latents(expected), raw)
        _close("decode_latents", flux2_ours.decode_latents(expected), flux2_diffusers.decode(raw).sample)


def test_patches_fold_into_channels_with_the_offset_after_the_channel():
    z = torch.arange(2 * 2 * 4 * 6, dtype=torch.float32).reshape(2, 2, 4, 6)
    patched = latent_norm.patchify(z, (2, 2))
    assert patched.shape == (2, 8, 2, 3)
    for c, dy, dx, i, j in ((0, 0, 1, 1, 2), (1, 1, 0, 0, 1), (1, 1, 1, 1, 0)):
        assert patched[1, c * 4 + dy * 2 + dx, i, j] == z[1, c, 2 * i + dy, 2 * j + dx]
    assert torch.equal(latent_norm.unpatchify(patched, (2, 2)), z)
    assert torch.equal(latent_norm.patchify(z[0], (2, 2)), patched[0])  # one latent, as a cache row holds
    with pytest.raises(ValueError, match="does not split into 2x2 patches"):
        latent_norm.patchify(z[..., :5], (2, 2))


def test_sizes_that_are_not_multiples_of_16_are_padded_to_whole_patches(flux2_ours):
    x = torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert flux2_ours.encode(x).latent_dist.mean.shape == (1, 8, 6, 4)  # 40x24 padded to 48x32, not 40x24
        latents = flux2_ours.encode_latents(x)
        assert latents.shape == (1, 32, 3, 2)
        assert flux2_ours.decode_latents(latents).shape == (1, 3, 48, 32)


def test_our_folder_is_diffusers_own_and_our_single_file_comes_back(flux2_ours, tmp_path, assert_same_tensors):
    import diffusers

    flux2_ours.save_pretrained(tmp_path / "folder")
    written = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert written["_class_name"] == "AutoencoderKLFlux2" and "scaling_factor" not in written
    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "folder")
    assert theirs.config.decoder_block_out_channels == [32, 32, 64, 64]
    assert_same_tensors(theirs.state_dict(), flux2_ours.state_dict())

    flux2_ours.save_single_file(tmp_path / "vae.safetensors")
    back = codec.AutoencoderKL.from_single_file(tmp_path / "vae.safetensors")
    assert back.config == flux2_ours.config
    assert_same_tensors(back.state_dict(), flux2_ours.state_dict())


def test_a_single_file_without_our_record_is_read_from_its_shapes(flux2_ours, tmp_path):
    from safetensors.torch import save_file

    from codec.keys import diffusers_to_ldm

    state = {k: v.contiguous() for k, v in flux2_ours.state_dict().items()}
    save_file(diffusers_to_ldm(state, 4), str(tmp_path / "ae.safetensors"))  # LDM keys and bn.*, no metadata
    config = codec.AutoencoderKL.from_single_file(tmp_path / "ae.safetensors").config
    assert config.patch_size == (2, 2) and config.scaling_factor == 1.0 and config.latent_channels == 8
    assert config.decoder_block_out_channels == (32, 32, 64, 64)


def test_the_presets_have_diffusers_own_weights_layout():
    import diffusers

    for name, extra in (("flux2", {}), ("flux2-small-decoder", {"decoder_block_out_channels": (96, 192, 384, 384)})):
        with torch.device("meta"):
            ours = codec.AutoencoderKL(codec.preset(name)).state_dict()
            theirs = diffusers.AutoencoderKLFlux2(**extra).state_dict()  # diffusers' defaults are FLUX.2's
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name
    assert codec.preset("flux2").latent_shape(1024, 1024) == (32, 128, 128)


def test_flux2s_defaults_are_diffusers_own():
    import inspect

    import diffusers

    from codec.config import BATCH_NORM_FIELDS, FLUX2_DEFAULTS

    parameters = inspect.signature(diffusers.AutoencoderKLFlux2.__init__).parameters
    theirs = {name: p.default for name, p in parameters.items() if name != "self"}
    assert set(BATCH_NORM_FIELDS) <= set(theirs) and set(FLUX2_KEYS) - {"force_upcast"} == set(theirs)
    for name, value in FLUX2_DEFAULTS.items():
        if name in theirs:
            default = theirs[name]
            assert (list(default) if isinstance(default, tuple) else default) == value, name


def test_config_files_take_flux2s_defaults_and_refuse_another_scaling():
    config = codec.AutoencoderKLConfig.from_dict({"_class_name": "AutoencoderKLFlux2"})
    assert config == codec.preset("flux2").with_settings(force_upcast=True)
    assert config.class_name == "AutoencoderKLFlux2" and config.scaling_factor == 1.0
    with pytest.raises(ConfigError, match="scales its latents by the batch-norm statistics alone"):
        config.with_settings(scaling_factor=0.5)
    with pytest.raises(ConfigError, match="decoder_block_out_channels is a field of AutoencoderKLFlux2"):
        codec.AutoencoderKLConfig(decoder_block_out_channels=(64,))
    with pytest.raises(ConfigError, match=r"describes a 'AutoencoderTiny'.*through diffusers"):
        codec.AutoencoderKLConfig.from_dict({"_class_name": "AutoencoderTiny"})
    # An AutoencoderKL's dict (and so every cache identity hashed from it) has no FLUX.2 field.
    assert "patch_size" not in codec.preset("sd").to_dict()


def test_tiled_and_half_precision_runs_agree_with_the_plain_fp32_one(flux2_ours):
    x = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        reference = flux2_ours.encode_latents(x)
        decoded = flux2_ours.decode_latents(reference)
        flux2_ours.enable_tiling(8)
        tiled = flux2_ours.decode_latents(reference)
        flux2_ours.disable_tiling()
        half = flux2_ours.to(torch.bfloat16)
        half_latents = half.encode_latents(x.bfloat16())
    assert tiled.shape == decoded.shape and not torch.equal(tiled, decoded)  # it did tile
    # Random weights make tiling's shared statistics a rough estimate: the bound of test_inference's tiled runs.
    assert torch.corrcoef(torch.stack([tiled.flatten(), decoded.flatten()]))[0, 1] > 0.6
    assert half_latents.dtype == torch.bfloat16 and torch.isfinite(half_latents).all()
    assert (half_latents.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_codec_encode_writes_the_pipelines_latents_and_codec_decode_reads_them(flux2_ours, flux2_folder, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from codec.cli import main
    from codec.images import image_to_tensor

    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "im.png")
    assert (
        main(["encode", str(tmp_path / "im.png"), "-o", str(tmp_path / "z.safetensors"), "--model", str(flux2_folder)])
        == 0
    )
    latent = load_file(str(tmp_path / "z.safetensors"))["latent.0"]
    with torch.no_grad():
        expected = flux2_ours.encode_latents(image_to_tensor(tmp_path / "im.png"))[0]
    assert latent.shape == (32, 3, 4)  # 40x56 padded to 48x64, in 2x2 patches of an f8 latent
    torch.testing.assert_close(latent, expected, rtol=0, atol=1e-5)
    assert main(["decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "im.png") as image:
        assert image.size == (56, 40)
