"""Opt-in torch.compile: untiled, gradient-free encode and decode go through the compiled passes, and give
the eager result; tiled inference and training stay eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import codec
from codec import inference


@pytest.fixture()
def vae(tiny_config) -> codec.AutoencoderKL:
    torch.manual_seed(0)
    return codec.AutoencoderKL(tiny_config).eval()


@pytest.fixture()
def compile_calls(monkeypatch):
    """torch.compile with the eager backend (no C++ build: seconds, not minutes), recording each call's mode
    and how often the compiled function ran."""
    calls = {"modes": [], "runs": 0}
    real = torch.compile

    def fake(fn, mode=None):
        calls["modes"].append(mode)
        compiled = real(fn, backend="eager")

        def counted(*args):
            calls["runs"] += 1
            return compiled(*args)

        return counted

    inference._compiled.cache_clear()
    monkeypatch.setattr(torch, "compile", fake)
    yield calls
    inference._compiled.cache_clear()


def test_compiled_untiled_passes_match_eager(vae, compile_calls):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        eager_moments = vae.encode(x).latent_dist.mean
        eager_image = vae.decode(eager_moments).sample
        vae.enable_compile("max-autotune")
        moments = vae.encode(x).latent_dist.mean
        image = vae.decode(moments).sample
    assert compile_calls["modes"] == ["max-autotune", "max-autotune"]  # one encode and one decode pass
    assert compile_calls["runs"] == 2
    torch.testing.assert_close(moments, eager_moments, atol=1e-5, rtol=0)
    torch.testing.assert_close(image, eager_image, atol=1e-5, rtol=0)


def test_tiled_inference_and_training_stay_eager(vae, compile_calls):
    vae.enable_compile()
    vae.enable_tiling(tile_latent_size=8)
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 20, 20))
    vae.disable_tiling()
    vae(torch.rand(1, 3, 16, 16) * 2 - 1).sample.mean().backward()  # gradients on: the training path
    assert compile_calls["runs"] == 0


def test_disable_compile_goes_back_to_eager(vae, compile_calls):
    vae.enable_compile()
    vae.disable_compile()
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 4, 4))
    assert compile_calls["runs"] == 0


def test_unknown_compile_mode_is_refused(vae):
    with pytest.raises(ValueError, match="compile mode must be one of"):
        vae.enable_compile("fastest")


def test_cache_cli_compile_flag_encodes_through_the_compiled_pass(tmp_path, compile_calls):
    from cache_testing import cli, image_folder, read_rows, tiny_model_dir

    model, folder = tiny_model_dir(tmp_path / "model"), image_folder(tmp_path / "images", [(32, 32)] * 3)
    base = ["cache", folder, "--resolution", 32, "--num-workers", 0, "--device", "cpu", "--model", model]
    code, _, stderr = cli([*base, "-o", tmp_path / "eager"])
    assert code == 0, stderr
    assert compile_calls["runs"] == 0
    code, _, stderr = cli([*base, "-o", tmp_path / "compiled", "--compile"])
    assert code == 0, stderr
    assert compile_calls["modes"] == ["default"] and compile_calls["runs"] >= 1
    eager, compiled = read_rows(tmp_path / "eager"), read_rows(tmp_path / "compiled")
    assert [row["key"] for row in compiled] == [row["key"] for row in eager] and len(eager) == 3
    for ours, theirs in zip(compiled, eager, strict=True):
        np.testing.assert_allclose(np.asarray(ours["mean"]), np.asarray(theirs["mean"]), atol=2e-3)  # fp16 storage


@pytest.mark.slow
def test_inductor_compiled_decode_matches_eager(vae):
    """The real compiler (builds C++ on a CPU: about a minute)."""
    inference._compiled.cache_clear()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = vae.decode(z).sample
        vae.enable_compile()
        compiled = vae.decode(z).sample
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
