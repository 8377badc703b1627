"""`codec stats`: latent statistics over a cache or a dataset, and writing them into a model's config.json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cache_testing import build, cli, image_folder, perturbed_copy, read_rows, tiny_model_dir

import codec
from codec.cache import writer
from codec.cache.identity import model_identity
from codec.cache.shards import CacheError
from codec.cache.stats import LatentStats, cache_stats

SIZES = [(32, 32), (40, 32), (32, 48), (36, 36), (48, 40), (32, 32), (56, 32)]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    model_dir = tiny_model_dir(root / "model")
    folder = image_folder(root / "images", SIZES)
    build(folder, root / "out", model_dir)
    return root / "out", folder, model_dir


def _stacked(out, name):
    return np.stack([np.asarray(r[name], dtype=np.float64).reshape(r["shape"]) for r in read_rows(out)])


def test_cache_statistics_match_numpy_for_sampled_and_mean_latents(cached):
    out, _, _ = cached
    means, variances = _stacked(out, "mean"), np.exp(_stacked(out, "logvar"))
    sampled = cache_stats(out)
    channel_mean = means.mean(axis=(0, 2, 3))
    channel_var = (means**2 + variances).mean(axis=(0, 2, 3)) - channel_mean**2
    np.testing.assert_allclose(sampled["latents_mean"], channel_mean, rtol=1e-9)
    np.testing.assert_allclose(sampled["latents_std"], np.sqrt(channel_var), rtol=1e-9)
    overall_var = (means**2 + variances).mean() - means.mean() ** 2
    assert sampled["scaling_factor"] == pytest.approx(1 / np.sqrt(overall_var), rel=1e-9)
    mean_only = cache_stats(out, posterior="mean")
    np.testing.assert_allclose(mean_only["latents_std"], means.std(axis=(0, 2, 3)), rtol=1e-9)
    assert mean_only["std"] == pytest.approx(means.std(), rel=1e-9) and mean_only["images"] == len(SIZES)


def test_running_sums_survive_a_large_mean():
    stats = LatentStats(2)
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1e-3, (10, 2, 8, 8)) + 1e4
    for latent in values:
        stats.add(latent)
    np.testing.assert_allclose(stats.result()["latents_std"], values.std(axis=(0, 2, 3)), rtol=1e-6)


def test_write_config_keeps_the_cache_valid_and_refuses_another_codec(cached, tmp_path, caplog):
    out, _, model_dir = cached
    target = shutil.copytree(model_dir, tmp_path / "model")
    before = model_identity(codec.AutoencoderKL.load(target))
    code, stdout, stderr = cli(["stats", out, "--write-config", target, "--json"])
    assert code == 0, stderr
    result = json.loads(stdout)
    config = json.loads((target / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == round(result["scaling_factor"], 6)
    # Not beside per-channel statistics: diffusers' SDXL pipelines would apply both.
    assert config["latents_mean"] is None and config["latents_std"] is None
    vae = codec.AutoencoderKL.load(target)
    assert model_identity(vae) == before  # scaling is not part of the identity: the cache still matches
    assert codec.LatentDataset(out, codec=vae, posterior="mean").scaling_factor == config["scaling_factor"]
    with pytest.raises(CacheError, match="--channel-stats"):
        codec.LatentDataset(out, codec=vae, normalize="channel")

    code, _, stderr = cli(["stats", out, "--write-config", target, "--channel-stats", "--posterior", "mean"])
    assert code == 0, stderr
    config = json.loads((target / "config.json").read_text())
    assert config["scaling_factor"] == 1.0 and len(config["latents_mean"]) == 4
    vae = codec.AutoencoderKL.load(target)
    whitened = torch.stack([item["latents"] for item in codec.LatentDataset(out, codec=vae, normalize="channel",
                                                                            posterior="mean", flip=False)])  # fmt: skip
    # What diffusers' SDXL pipelines do before decoding, latents * std / scaling + mean, gives back the posterior.
    mean, std = (torch.tensor(config[k]).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
    # The default follows the config, as AutoencoderKL.scale_latents and diffusers' pipelines do.
    default = codec.LatentDataset(out, codec=vae, posterior="mean", flip=False)
    assert default.normalize == "channel" and torch.equal(torch.stack([item["latents"] for item in default]), whitened)
    with torch.no_grad():
        assert torch.allclose(vae.scale_latents(vae.unscale_latents(whitened)), whitened, atol=1e-5)
    with caplog.at_level("WARNING"):
        raw = codec.LatentDataset(out, codec=vae, normalize="scaling", posterior="mean", flip=False)
    assert "normalize='scaling' leaves unused" in caplog.text  # per-channel statistics asked to be ignored
    raw_latents = torch.stack([item["latents"] for item in raw])
    assert torch.allclose(vae.scale_latents(raw_latents), whitened, atol=1e-4)  # the model scales as the default
    shifted = codec.LatentDataset(out, codec=vae, shift_factor=0.5, posterior="mean", flip=False)  # factors given:
    assert shifted.normalize == "scaling"  # (z - shift) * scaling, as asked, not the statistics
    torch.testing.assert_close(torch.stack([item["latents"] for item in shifted]), raw_latents - 0.5)
    torch.testing.assert_close(whitened * std / config["scaling_factor"] + mean, raw_latents, atol=1e-4, rtol=1e-4)
    assert whitened.std(dim=(0, 2, 3)).sub(1).abs().max() < 0.05  # and the cached latents are whitened
    other = perturbed_copy(model_dir, tmp_path / "other")
    code, _, stderr = cli(["stats", out, "--write-config", other])
    assert code == 2 and "not the codec these latents were made with" in stderr


def test_statistics_of_a_dataset_encode_it_first(cached):
    out, folder, model_dir = cached
    args = ["stats", folder, "--model", model_dir, "--resolution", 32, "--num-workers", 0, "--json"]
    code, stdout, stderr = cli(args)
    assert code == 0, stderr
    direct = json.loads(stdout)
    np.testing.assert_allclose(direct["latents_std"], cache_stats(out)["latents_std"], rtol=1e-3)
    code, stdout, _ = cli([*args, "--limit", 3])
    assert json.loads(stdout)["images"] == 3
    encoded = []
    real_build = writer.build_cache
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "build_cache", lambda *a, **k: encoded.append(1) or real_build(*a, **k))
        code, _, stderr = cli([*args, "--write-config", folder / "no-model-here"])
    assert code == 2 and "no-model-here" in stderr and not encoded  # refused before encoding anything
    code, _, stderr = cli([*args, "--limit", 0])  # had meant every image
    assert code == 2 and "--limit must be at least 1, got 0" in stderr


def test_the_text_report_says_how_many_images_were_unreadable(cached, tmp_path):
    _, folder, model_dir = cached
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    (mixed / "broken.png").write_bytes(b"not a png")
    code, stdout, stderr = cli(["stats", mixed, "--model", model_dir, "--resolution", 32, "--num-workers", 0])
    assert code == 0, stderr
    assert f"{len(SIZES)} images; 1 unreadable skipped," in stdout
