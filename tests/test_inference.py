"""Padding, slicing, tiling and the half-precision fallback around the network."""

from __future__ import annotations

import itertools
import logging
import os

import pytest
import torch

import codec
from codec import inference, streaming, tiling
from codec.metrics import psnr


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    return psnr(to8(a).permute(0, 2, 3, 1), to8(b).permute(0, 2, 3, 1)).min().item()


@pytest.fixture()
def vae(tiny_config) -> codec.AutoencoderKL:
    torch.manual_seed(0)
    return codec.AutoencoderKL(tiny_config).eval()


@pytest.fixture()
def vae_no_attention(tiny_config) -> codec.AutoencoderKL:
    torch.manual_seed(0)
    config = codec.AutoencoderKLConfig(**{**tiny_config.to_dict(), "mid_block_add_attention": False})
    return codec.AutoencoderKL(config).eval()


@pytest.mark.parametrize(
    "length, max_tile, overlap, align",
    [(100, 32, 8, 1), (96, 32, 8, 8), (33, 32, 4, 1), (200, 64, 16, 8), (128, 64, 8, 1), (1000, 96, 8, 8)],
)
def test_tiles_cover_the_axis_with_the_overlap_and_alignment(length, max_tile, overlap, align):
    tile, starts = tiling.plan_axis(length, max_tile, overlap, align)
    assert tile <= max_tile and tile % align == 0
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(s % align == 0 for s in starts)
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))
    # the fewest tiles that can cover it at this size limit
    assert len(starts) == max(1, -(-(length - overlap) // (max_tile - overlap)))


def test_an_axis_that_fits_is_one_tile():
    assert tiling.plan_axis(20, 32, 8) == (20, [0])
    assert tiling.plan_axis(32, 32, 8) == (32, [0])  # exactly one tile (a 512-pixel side at tile 64)
    assert tiling.plan_axis(128, 64, 8) == (48, [0, 40, 80])


def test_a_tiles_blend_weights_drop_the_outer_quarter_of_an_overlap_and_ramp_across_the_middle_half():
    weights = tiling._edge_weights(16, 8, 0)  # an overlap of 8 with the previous tile, none with the next
    torch.testing.assert_close(weights[:8], torch.tensor([0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1]))
    assert torch.equal(weights[8:], torch.ones(8))
    mirrored = tiling._edge_weights(16, 0, 8)
    assert torch.equal(mirrored, weights.flip(0))
    assert torch.equal(weights[:8] + mirrored[8:], torch.ones(8))  # neighbours' weights sum to 1 in the overlap


def test_shared_stats_from_the_full_input_reproduce_the_untiled_output(vae_no_attention, monkeypatch):
    """With exact statistics and an overlap wider than the receptive field, tiles must agree with untiled."""
    z = torch.randn(1, 4, 40, 48)
    with torch.no_grad():
        reference = vae_no_attention.decode_raw(z)
        monkeypatch.setattr(tiling, "downscale_to_fit", lambda x, max_side, align: x)
        tiled = tiling.tiled_apply(vae_no_attention, vae_no_attention.decode_raw, z, 24, 16, 8, 1, 3)
    assert tiled.shape == reference.shape
    assert _psnr(tiled, reference) > 40


def test_recorded_stats_applied_to_the_same_input_change_nothing(vae):
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        reference = vae.decode_raw(z)
        stats = tiling.record_norm_stats(vae, vae.decode_raw, z)
        with tiling.shared_norm_stats(vae, stats):
            again = vae.decode_raw(z)
    assert torch.allclose(again, reference, atol=1e-4)
    assert all(norm.stats_hook is None for norm in vae.modules() if hasattr(norm, "stats_hook"))


def test_small_memory_budget_tiles_encode_and_decode(vae, monkeypatch):
    calls = []
    real_tiles, real_bands = tiling.tiled_apply, streaming.stream_decoder_tail
    monkeypatch.setattr(tiling, "tiled_apply", lambda *a, **k: calls.append("tiles") or real_tiles(*a, **k))
    monkeypatch.setattr(streaming, "stream_decoder_tail", lambda *a, **k: calls.append("bands") or real_bands(*a, **k))
    x = torch.rand(1, 3, 200, 168, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        untiled = vae.encode(x).latent_dist.mean
        untiled_decoded = vae.decode(untiled).sample
        assert not calls
        vae.memory_budget = 16 << 20  # far below what a 200x168 image needs at these widths
        latent = vae.encode(x).latent_dist.mean
        decoded = vae.decode(untiled).sample
    assert calls == ["tiles", "bands"]  # encode in tiles, decode streamed in bands of rows
    assert latent.shape == untiled.shape == (1, 4, 25, 21)
    assert decoded.shape == (1, 3, 200, 168)
    # The same picture, up to the shared statistics' estimate. These random weights amplify its error (the
    # embedded model's tiled output is within 30-50 dB, test_a_thin_strip... and test_streaming), so the bound is
    # loose: correlation 0.87 and 0.81 here, where a lost or misplaced tile falls far below.
    assert _correlation(latent, untiled) > 0.6 and _correlation(decoded, untiled_decoded) > 0.6


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (a - a.mean()).flatten(), (b - b.mean()).flatten()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_explicit_tiling_and_odd_sizes(vae):
    x = torch.rand(1, 3, 150, 130, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(x).latent_dist.mean
        decoded = vae.decode(latent).sample
        vae.enable_tiling(tile_latent_size=8)
        out = vae(x).sample
        tiled_latent = vae.encode(x).latent_dist.mean
        tiled_decoded = vae.decode(latent).sample
    assert out.shape == x.shape
    # Each half apart (correlation 0.71 and 0.81 with these random weights): chained, a random decoder amplifies
    # the encoder's small differences until the round trip's correlation is 0.09.
    assert _correlation(tiled_latent, latent) > 0.6 and _correlation(tiled_decoded, decoded) > 0.6


def test_batch_is_sliced_to_fit_the_budget(vae, monkeypatch):
    seen = []
    real = codec.AutoencoderKL.decode_raw
    monkeypatch.setattr(codec.AutoencoderKL, "decode_raw", lambda self, z: seen.append(z.shape[0]) or real(self, z))
    z = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        whole = vae.decode(z).sample
        assert seen == [5]
        seen.clear()
        vae.memory_budget = codec.memory.decode_bytes(vae.config, 8, 8, 4, batch=2)
        sliced = vae.decode(z).sample
    assert seen == [2, 2, 1]
    assert torch.allclose(whole, sliced, atol=1e-5)


def test_training_passes_through_untouched(vae):
    """With gradients on, no tiling or slicing: the step must optimise exactly the network."""
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    vae.memory_budget = float("inf")  # nothing to tile or slice for
    plain = vae(x).sample.detach()
    vae.memory_budget = 1 << 10
    vae.enable_tiling(8)
    out = vae(x).sample
    out.mean().backward()
    assert vae.encoder.conv_in.weight.grad is not None
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)  # the network itself: neither tiled nor sliced


def test_half_precision_overflow_is_recomputed_in_fp32(vae, caplog, monkeypatch):
    from codec import precision

    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: True)  # fp16 arithmetic, not the fp32 copy
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations beyond fp16's range (65504), finite in fp32
        reference = vae.decode(z).sample
        half = vae.half()
        with torch.no_grad():
            raw = half.decode_raw(z.half())
        assert not torch.isfinite(raw).all(), "the test needs an input that overflows in fp16"
        with caplog.at_level(logging.WARNING):
            out = half.decode(z).sample
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 1e-2
    assert "recomputing in float32" in caplog.text


def test_half_precision_overflow_in_a_tiled_decode_is_recomputed_with_the_shared_statistics(vae, monkeypatch):
    from codec import precision, tiling

    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: True)  # fp16 arithmetic, not the fp32 copy
    # The fp32 reference's statistics passes in fp32 on every CPU: with native bf16 they would run in bf16, whose
    # 0.4% error the 1e6-scaled weights below turn into 0.04 (measured on an AVX512-BF16 EPYC).
    monkeypatch.setattr(tiling, "cpu_has_native_bf16", lambda: False)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decoder.up_blocks[1].resnets[0].conv1.weight.mul_(1e6)  # overflows fp16 inside the streamed tail
        vae.enable_tiling(4)
        reference = vae.decode(z).sample  # fp32, tiled the same way
        half = vae.half()
        assert not torch.isfinite(half.decode_raw(z.half())).all(), "the test needs an input that overflows in fp16"
        out = half.decode(z).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 2e-2
    assert all(m.stats_hook is None for m in precision.fp32_copy(half).modules() if hasattr(m, "stats_hook"))


@pytest.mark.parametrize("encode", [False, True])
def test_an_overflow_early_in_a_tiled_pass_is_recomputed_whole(vae, monkeypatch, encode):
    # The first stage (decoder head, or the encoder's tiled convolutions) overflows fp16 while its fp32 output,
    # cast back to half for the next stage, would be inf: only a whole fp32 pass gives a finite result.
    from codec import precision

    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: True)
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The encoder's last convolutional block, whose output the tiled head hands to the attention tail.
        (vae.encoder.down_blocks[3].resnets[0].conv2 if encode else vae.decoder.conv_in).weight.mul_(1e5)
        vae.enable_tiling(8 if encode else 4)
        reference = vae.encode(x).latent_dist.mean if encode else vae.decode(z).sample  # fp32, tiled alike
        half = vae.half()
        out = half.encode(x).latent_dist.mean if encode else half.decode(z).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 2e-2 * reference.abs().max().clamp(min=1)


def test_bad_inputs_name_the_problem(vae):
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        vae.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="decode input"):
        vae.decode(torch.rand(1, 3, 4, 4))
    with pytest.raises(TypeError):
        vae.encode([[1.0]])


def test_pad_to_multiple_reflects_and_keeps_the_image():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded = inference.pad_to_multiple(x, 8)
    assert padded.shape == (2, 3, 8, 8)
    assert torch.equal(padded[..., :5, :7], x)
    tiny = torch.rand(1, 3, 2, 2)
    assert inference.pad_to_multiple(tiny, 8).shape == (1, 3, 8, 8)  # too small to reflect: replicated


def test_a_frozen_model_tiles_outside_no_grad_and_a_trained_one_keeps_its_graph(vae):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vae.enable_tiling(4)
    with torch.no_grad():
        tiled = vae.decode(z).sample
        vae.disable_tiling()
        whole = vae.decode(z).sample
        vae.enable_tiling(4)
    assert not torch.equal(tiled, whole)  # the tiled path computes differently, so the two can be told apart
    out = vae.decode(z).sample  # grad mode on, weights trainable: the plain forward, differentiable
    assert out.requires_grad and torch.allclose(out, whole, atol=1e-5)
    vae.requires_grad_(False)  # frozen, as in a diffusion training loop: the inference path, tiling included
    frozen = vae.decode(z).sample
    assert not frozen.requires_grad and torch.equal(frozen, tiled)


def test_settings_are_checked_where_they_are_given(vae, monkeypatch):
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean
        vae.memory_budget = 5e6  # a float number of bytes: batch slicing had passed it to range()
        assert torch.allclose(vae.encode(x).latent_dist.mean, expected, atol=1e-5)
    for bad in (1, 0, -3, 2.5):
        with pytest.raises(ValueError, match="tile_latent_size must be a whole number"):
            vae.enable_tiling(bad)
    import numpy as np

    vae.enable_tiling(np.int64(16))  # a whole number, whatever its type
    assert vae.tile_latent_size == 16 and type(vae.tile_latent_size) is int
    vae.disable_tiling()
    vae.memory_budget = None
    for bad in ("garbage", "64MB", "nan", "inf", "-5", "0"):
        monkeypatch.setenv("CODEC_MEMORY_BUDGET_MB", bad)
        message = f"CODEC_MEMORY_BUDGET_MB='{bad}': expected a positive number"
        with pytest.raises(ValueError, match=message), torch.no_grad():
            vae.decode(torch.randn(1, 4, 4, 4))


def test_the_settings_live_in_one_options_object_that_the_named_attributes_read_and_write(vae):
    vae.enable_tiling(8)
    vae.enable_slicing()
    vae.memory_budget = 1 << 20
    vae.enable_compile("max-autotune")
    expected = inference.InferenceOptions(True, True, 1 << 20, 8, "max-autotune")
    assert vae.inference_options == expected
    assert not {"use_tiling", "tile_latent_size", "memory_budget"} & set(vars(vae))  # no second copy on the module
    vae.inference_options.tile_latent_size = 4
    assert vae.tile_latent_size == vae.tile_latent_min_size == 4 and vae.tile_sample_min_size == 32
    with pytest.raises(ValueError, match="compile mode must be one of"):
        vae.compile_mode = "fastest"
    with pytest.raises(ValueError, match="tile_latent_size must be a whole number"):
        vae.tile_latent_size = 2.5
    assert vae.inference_options == inference.InferenceOptions(True, True, 1 << 20, 4, "max-autotune")


def test_a_strip_whose_area_fits_one_tile_is_not_tiled(vae):
    # 3x17 latent positions with 16-position tiles: wider than a tile, smaller than one in area. Tiled, its
    # statistics passes shrank the short side to a pixel or two (17.7 dB with the embedded model, diffusers 35.2).
    z = torch.randn(1, 4, 3, 17, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(z).sample
        vae.enable_tiling(16)
        assert torch.equal(vae.decode(z).sample, whole)
        x = torch.rand(1, 3, 24, 136) * 2 - 1
        vae.disable_tiling()
        encoded = vae.encode(x).latent_dist.mean
        vae.enable_tiling(16)  # in latent positions for encode too: 3x17 again
        assert torch.equal(vae.encode(x).latent_dist.mean, encoded)


def test_a_strips_statistics_passes_are_sized_by_area_not_by_its_longer_side(vae):
    """The passes take `fraction` of the input's area, up to a max_side square's: bounded by the longer side, a
    16x192 strip's near pass had been 3x32 (96 positions of the 1,024 allowed) and its far pass 1x16."""
    shapes = []

    def run(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape[-2:]))
        return vae.decoder.forward_tail(t)

    with torch.no_grad():
        features = vae.decode_head(torch.randn(1, 4, 16, 192))
        tiling.estimate_norm_stats(vae.decoder, run, features, 32, 1, low_precision=False, fraction=3 / 8)
    (near_h, near_w), (far_h, far_w) = shapes
    assert near_h * near_w <= 32 * 32 and near_h * near_w >= 0.9 * (3 / 8) ** 2 * 16 * 192
    assert abs(near_w / near_h - 12) < 1.5 and abs(far_w / far_h - 12) < 1.5 and far_h * far_w <= 16 * 16
    # A side too thin to shrink stays at the alignment, and the other is cut so that the area stays in budget.
    for h, w in ((8, 40000), (40000, 8), (9, 70)):
        passed = tiling.downscale_to_fit(torch.zeros(1, 1, h, w), 16, 8).shape[-2:]
        assert passed[0] * passed[1] <= 16 * 16 and (passed[0] <= passed[1]) == (h <= w) and min(passed) == 8


def test_a_thin_strip_of_a_photo_tiles_close_to_untiled_with_the_embedded_model():
    """768x64 pixels at tile 16 (128 pixels): tiles along the strip, the statistics from area-sized passes
    (28.8 dB round trip here; passes bounded by the longer side would give 23.1)."""
    from codec.cli.demo import SAMPLES
    from codec.images import image_to_tensor

    vae = codec.AutoencoderKL.load("builtin")
    photos = torch.cat([image_to_tensor(SAMPLES / f"{name}.png") for name in ("astronaut", "chelsea", "coffee")], -1)
    strip = photos[..., 100:164, :].transpose(-1, -2).contiguous()  # 768 tall, 64 wide
    with torch.no_grad():
        whole = vae.decode(vae.encode(strip).latent_dist.mode()).sample
        vae.enable_tiling(16)
        tiled = vae.decode(vae.encode(strip).latent_dist.mode()).sample
    assert _psnr(tiled, whole) > 27


def _photo_mosaic(side: int) -> torch.Tensor:
    """scikit-image's astronaut, chelsea, coffee and rocket, each scaled to cover a square of half `side` and
    center-cropped (as `codec cache` does), as a 2x2 mosaic in [-1, 1]: real photographic detail at `side` x `side`."""
    from PIL import Image

    from codec.cache.preprocess import Preprocessing, to_model_input

    skimage_data = pytest.importorskip("skimage.data")  # the test extra's scikit-image ships these photos
    prepare = Preprocessing(resolution=side // 2)
    names = ("astronaut", "chelsea", "coffee", "rocket")
    squares = [to_model_input(prepare(Image.fromarray(getattr(skimage_data, n)())).pixels[None]) for n in names]
    return torch.cat([torch.cat(squares[:2], -1), torch.cat(squares[2:], -1)], -2)


def test_a_streamed_tiled_decode_at_1024_stays_within_40_db_of_untiled_with_the_embedded_model():
    """The size where tiled decode streams with estimated statistics (43.0 dB here): both statistics passes run
    every up block, which a shortcut that skipped the last one would fail (34.4 dB, docs/tiling.md)."""
    vae = codec.AutoencoderKL.load("builtin")
    vae.memory_budget = float("inf")  # untiled unless asked
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, min(2, os.cpu_count() or 1)))  # conftest's one thread makes its 28 s 47
    try:
        with torch.no_grad():
            z = vae.encode(_photo_mosaic(1024)).latent_dist.mode()
            whole = vae.decode(z).sample
            vae.enable_tiling(64)  # diffusers' tile: 128x128 latent positions stream in bands
            tiled = vae.decode(z).sample
    finally:
        torch.set_num_threads(threads)
    assert _psnr(tiled, whole) > 40


def test_inputs_and_budgets_that_would_be_misread_are_refused(vae, caplog, monkeypatch):
    with pytest.raises(TypeError, match=r"encode input must be floating point, got torch.uint8.*127\.5"):
        vae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))  # 0..255 read as if in [-1, 1]
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decode(z).sample
        vae.memory_budget = float("inf")  # never tile
        assert torch.equal(vae.decode(z).sample, expected)
        for bad in (0, -5, float("nan"), "100", True):
            vae.memory_budget = bad
            with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
                vae.decode(z)
        vae.memory_budget = None

    from codec import precision

    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: True)  # fp16 arithmetic, not the fp32 copy
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        out = vae.half().decode(torch.full((1, 4, 4, 4), float("nan"))).sample
    assert out.dtype == torch.float16 and "recomputing" not in caplog.text  # NaN in, NaN out: nothing to redo


def test_the_default_budget_and_its_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("CODEC_MEMORY_BUDGET_MB", raising=False)
    monkeypatch.setattr(codec.memory, "_available_memory", lambda: 2 << 30)
    assert codec.memory.default_budget(cpu) == 512 << 20  # a quarter of what is available...
    monkeypatch.setattr(codec.memory, "_available_memory", lambda: 64 << 30)
    assert codec.memory.default_budget(cpu) == 1 << 30  # ...at most 1 GiB
    monkeypatch.setenv("CODEC_MEMORY_BUDGET_MB", "1.5")
    assert codec.memory.default_budget(cpu) == 3 << 19  # megabytes (MiB), not bytes


def test_enable_tiling_without_a_size_tiles_at_what_the_budget_allows(vae, monkeypatch):
    sides = []
    real = tiling.tiled_apply
    monkeypatch.setattr(tiling, "tiled_apply", lambda *a, **k: sides.append(a[3]) or real(*a, **k))
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae.enable_tiling()
    with torch.no_grad():
        vae.memory_budget = float("inf")
        vae.encode(x)
        assert sides == []  # it fits: whole
        budget = codec.memory.encode_bytes(vae.config, 160, 160, 4)  # a 160-pixel square's worth, in fp32
        vae.memory_budget = budget
        vae.encode(x)
    # The search steps down by 3/4 from the whole image, aligned to 8: 256, 192, 144. The first that fits is taken.
    assert sides == [144]
    assert codec.memory.encode_bytes(vae.config, 192, 192, 4) > budget


def test_beyond_global_attention_the_whole_network_runs_per_tile(monkeypatch):
    # Over GLOBAL_ATTENTION_MAX_TOKENS latent positions (1024x1024 pixels) one attention over the whole image
    # would not fit, so encode and decode tile the whole network, attention included: lowered here to 4x4. The
    # embedded model on a photo, since random weights make a tile's attention output unlike the whole's (kodim23
    # at tile 16: decode 37.7 dB this way, 40.0 streamed).
    from codec.cli.demo import SAMPLES
    from codec.images import image_to_tensor

    modules = []
    real = tiling.tiled_apply
    monkeypatch.setattr(tiling, "tiled_apply", lambda *a, **k: modules.append(type(a[0]).__name__) or real(*a, **k))
    monkeypatch.setattr(inference, "GLOBAL_ATTENTION_MAX_TOKENS", 16)
    vae = codec.AutoencoderKL.load("builtin")
    x = image_to_tensor(SAMPLES / "chelsea.png")[..., :192, :256]
    with torch.no_grad():
        latent = vae.encode(x).latent_dist.mean
        decoded = vae.decode(latent).sample
        vae.enable_tiling(16)
        tiled_latent = vae.encode(x).latent_dist.mean
        tiled_decoded = vae.decode(latent).sample
    assert modules == ["AutoencoderKL", "AutoencoderKL"]  # the whole model per tile, not its encoder's head
    assert _psnr(tiled_decoded, decoded) > 30 and _psnr(vae.decode(tiled_latent).sample, decoded) > 28  # 34.9, 32.7
