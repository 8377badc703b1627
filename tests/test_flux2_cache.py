"""A FLUX.2 codec's cache: raw posteriors stored, its normalisation recorded, the pipeline's latents read back;
`codec stats` recomputes the batch-norm statistics of its patched latents."""

from __future__ import annotations

import json

import pytest
import torch
from cache_testing import build, cli, image_folder

import codec
from codec.cache.preprocess import Preprocessing, to_model_input
from codec.cache.stats import cache_stats
from codec.images import load_image

SIZES = [(32, 32), (48, 32), (32, 48), (40, 40), (64, 32)]


@pytest.fixture(scope="module")
def flux2_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2_cache")
    model = codec.AutoencoderKL.load("preset:flux2-tiny")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # statistics other than the identity, so that applying them shows
        model.bn.running_mean.copy_(torch.randn(model.bn.running_mean.shape, generator=generator))
        model.bn.running_var.uniform_(0.5, 3.0, generator=generator)
    model.save_pretrained(root / "model")
    folder = image_folder(root / "images", SIZES)
    build(folder, root / "out", root / "model", buckets=True, bucket_step=16, flip=True)
    return root / "out", folder, root / "model"


def test_the_cache_stores_raw_posteriors_and_reads_back_the_pipelines_latents(flux2_cache):
    out, folder, model_dir = flux2_cache
    vae = codec.AutoencoderKL.load(model_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["codec"]["latent_norm"]["patch_size"] == [2, 2]
    prep = Preprocessing(32, buckets=True, bucket_step=16)
    for reader_codec in (vae, manifest["codec"]["identity"]):  # the model's statistics, or the manifest's
        dataset = codec.LatentDataset(out, codec=reader_codec, posterior="mean", flip=False)
        for index in range(len(dataset)):
            item = dataset[index]
            prepared = prep(load_image(folder / item["key"]))
            with torch.no_grad():
                expected = vae.encode_latents(to_model_input(prepared.pixels[None]))[0]
            assert item["latents"].shape == expected.shape == (32, *(s // 16 for s in prepared.bucket))
            torch.testing.assert_close(item["latents"], expected, atol=5e-3, rtol=5e-3)  # stored in fp16
    _check_against_the_pipeline(model_dir, dataset, folder, prep)
    with pytest.raises(ValueError, match="normalize, scaling_factor and shift_factor do not apply"):
        codec.LatentDataset(out, codec=vae, scaling_factor=0.5)


def _check_against_the_pipeline(model_dir, dataset, folder, prep) -> None:
    """The latents read back are those diffusers' own Flux2 pipeline makes of the preprocessed image."""
    pytest.importorskip("transformers")  # the pipeline's module imports it
    import types

    import diffusers
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    vae = diffusers.AutoencoderKLFlux2.from_pretrained(model_dir).eval()
    pipeline = types.SimpleNamespace(vae=vae, _patchify_latents=Flux2Pipeline._patchify_latents)
    item = dataset[1]
    pixels = to_model_input(prep(load_image(folder / item["key"])).pixels[None])
    with torch.no_grad():
        expected = Flux2Pipeline._encode_vae_image(pipeline, pixels, generator=None)[0]
    torch.testing.assert_close(item["latents"], expected, atol=5e-3, rtol=5e-3)  # stored in fp16


def test_a_bucket_step_that_splits_a_patch_is_refused(tmp_path, flux2_cache):
    _, folder, model_dir = flux2_cache
    with pytest.raises(ValueError, match=r"--bucket-step 8 is not a multiple of .* 16"):
        build(folder, tmp_path / "out", model_dir, buckets=True, bucket_step=8)


def _patched_raw(vae, latents: torch.Tensor) -> torch.Tensor:
    """A dataset item's latents with the batch norm undone, patches still folded: (channels, values)."""
    mean, std = vae.bn.statistics(latents)
    return (latents * std + mean).reshape(latents.shape[0], -1)


def test_stats_recompute_the_batch_norm_statistics_and_write_them_into_the_weights(flux2_cache, tmp_path):
    import shutil

    out, _, model_dir = flux2_cache
    result = cache_stats(out, posterior="mean")
    vae = codec.AutoencoderKL.load(model_dir)
    dataset = codec.LatentDataset(out, codec=vae, posterior="mean", flip=False)
    patched = torch.cat([_patched_raw(vae, dataset[i]["latents"]) for i in range(len(dataset))], dim=1).double()
    assert len(result["latent_norm"]["running_mean"]) == 32
    torch.testing.assert_close(
        torch.tensor(result["latent_norm"]["running_mean"], dtype=torch.float64), patched.mean(1), atol=5e-3, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(result["latent_norm"]["running_var"], dtype=torch.float64),
        patched.var(1, correction=0),
        atol=5e-3,
        rtol=1e-2,
    )

    target = shutil.copytree(model_dir, tmp_path / "model")
    code, stdout, _ = cli(["stats", out, "--posterior", "mean", "--write-config", target])
    assert code == 0 and "bn.running_mean, bn.running_var" in stdout
    updated = codec.AutoencoderKL.load(target)
    torch.testing.assert_close(updated.bn.running_mean.double(), patched.mean(1), atol=5e-3, rtol=0)
    dataset = codec.LatentDataset(out, codec=updated, posterior="mean", flip=False)  # still valid for the model
    per_channel = torch.cat([dataset[i]["latents"].reshape(32, -1) for i in range(len(dataset))], dim=1)
    assert per_channel.mean(1).abs().max() < 0.05 and (per_channel.std(1, correction=0) - 1).abs().max() < 0.05
