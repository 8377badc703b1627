"""Row-streamed decoding: band by band it must reproduce the decoder's tail exactly, whatever the band height."""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile

import pytest
import torch

import codec
from codec import streaming, tiling


@pytest.fixture()
def vae(tiny_config) -> codec.AutoencoderKL:
    torch.manual_seed(0)
    return codec.AutoencoderKL(tiny_config).eval()


@pytest.mark.parametrize("band_rows", [1, 2, 3, 5, 13, 40])
@pytest.mark.parametrize("channels_last", [False, True])
def test_streamed_tail_equals_the_whole_tail_for_any_band(vae, band_rows, channels_last):
    """With the same (shared) statistics, streaming changes nothing: bands of 1 row included, odd sizes too."""
    z = torch.randn(2, 4, 13, 11)
    with torch.no_grad():
        features = vae.decode_head(z)
        if channels_last:
            features = features.contiguous(memory_format=torch.channels_last)
        stats = tiling.record_norm_stats(vae.decoder, vae.decoder.forward_tail, features)
        with tiling.shared_norm_stats(vae.decoder, stats):
            whole = vae.decoder.forward_tail(features)
            streamed = streaming.stream_decoder_tail(vae.decoder, features, band_rows)
    assert streamed.shape == whole.shape == (2, 3, 13 * 8, 11 * 8)
    torch.testing.assert_close(streamed, whole, atol=2e-5, rtol=0)


def test_without_shared_statistics_each_band_normalises_itself(vae):
    """The reason streaming needs the stats pass: a band's own statistics are not the image's."""
    z = torch.randn(1, 4, 16, 8)
    z[:, :, 8:] += 3  # the lower half differs in level, as a photo's sky and ground do
    with torch.no_grad():
        features = vae.decode_head(z)
        whole = vae.decoder.forward_tail(features)
        banded = streaming.stream_decoder_tail(vae.decoder, features, 4)
    assert (banded - whole).abs().max() > 1e-2


def test_tiled_decode_streams_and_matches_untiled_with_exact_statistics(vae, monkeypatch):
    """Through the public API: with the statistics made exact, tiled decode equals untiled to rounding."""
    z = torch.randn(1, 4, 24, 20)
    with torch.no_grad():
        reference = vae.decode(z).sample
        monkeypatch.setattr(tiling, "downscale_to_fit", lambda x, max_side, align: x)
        monkeypatch.setattr(tiling, "statistics_autocast", lambda x: contextlib.nullcontext())  # fp32 passes
        vae.enable_tiling(tile_latent_size=8)  # bands of 8 * 8 // (2 * 20) = 1 latent row
        tiled = vae.decode(z).sample
    torch.testing.assert_close(tiled, reference, atol=5e-5, rtol=0)


@pytest.mark.parametrize(("fraction", "near_side", "far_side"), [(1 / 2, 16, 8), (3 / 8, 12, 6)])
def test_estimated_statistics_extrapolate_from_two_downscaled_passes(vae, fraction, near_side, far_side):
    """Mean and log-variance move linearly per halving: the estimate carries the step between the two passes
    on for the log2(1 / fraction) halvings up to full size (one from 1/2, 1.415 from 3/8)."""
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        features = vae.decode_head(z)
        run = vae.decoder.forward_tail
        near = tiling.record_norm_stats(vae.decoder, run, tiling.downscale_to_fit(features, near_side, 1))
        far = tiling.record_norm_stats(vae.decoder, run, tiling.downscale_to_fit(features, far_side, 1))
        estimate = tiling.estimate_norm_stats(vae.decoder, run, features, 64, 1, False, fraction)
    assert estimate.keys() == near.keys()
    k = math.log2(1 / fraction)
    for key, (mean, var) in estimate.items():
        torch.testing.assert_close(mean, near[key][0] + k * (near[key][0] - far[key][0]))
        torch.testing.assert_close(var.log(), near[key][1].log() + k * (near[key][1].log() - far[key][1].log()))


def test_estimate_fraction_must_be_a_share_of_the_size(vae):
    with pytest.raises(ValueError, match="fraction"):
        tiling.estimate_norm_stats(vae.decoder, vae.decoder.forward_tail, torch.zeros(1, 128, 8, 8), 64, 1, fraction=0)


@pytest.mark.parametrize("band_rows", [1, 4])
def test_streaming_from_a_later_up_block_equals_the_tail_from_there(vae, band_rows):
    """Tiled decode runs the first up block whole and streams the rest: the stream must start anywhere."""
    z = torch.randn(1, 4, 7, 9)
    with torch.no_grad():
        features = vae.decoder.up_blocks[0](vae.decode_head(z))
        run = functools.partial(vae.decoder.forward_tail, first_block=1)
        stats = tiling.record_norm_stats(vae.decoder, run, features)
        with tiling.shared_norm_stats(vae.decoder, stats):
            whole = run(features)
            streamed = streaming.stream_decoder_tail(vae.decoder, features, band_rows, first_block=1)
    assert streamed.shape == whole.shape == (1, 3, 7 * 8, 9 * 8)
    torch.testing.assert_close(streamed, whole, atol=2e-5, rtol=0)


def test_band_rows_must_be_positive(vae):
    with pytest.raises(ValueError, match="band_rows"):
        streaming.stream_decoder_tail(vae.decoder, torch.zeros(1, 64, 4, 4), 0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_stats_match_a_direct_reduction_over_each_group(channels_last):
    from codec.groupnorm import group_stats

    x = torch.randn(2, 12, 5, 7) * torch.arange(1, 13).view(1, 12, 1, 1) + torch.arange(12).view(1, 12, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = group_stats(x, 3)
    direct_var, direct_mean = torch.var_mean(x.reshape(2, 3, -1), dim=-1, correction=0)
    torch.testing.assert_close(mean, direct_mean)
    torch.testing.assert_close(var, direct_var)


def test_statistics_passes_in_bf16_estimate_the_fp32_statistics(vae, monkeypatch):
    """Where bf16 is fast the passes run under autocast; what they estimate stays within a small tolerance."""
    monkeypatch.setattr(tiling, "cpu_has_native_bf16", lambda: True)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = vae.decode_head(z)
        run = vae.decoder.forward_tail
        exact = tiling.estimate_norm_stats(vae.decoder, run, features, 64, 1, low_precision=False)
        fast = tiling.estimate_norm_stats(vae.decoder, run, features, 64, 1)
    assert fast.keys() == exact.keys()
    differs = False
    for key, (mean, var) in exact.items():
        fast_mean, fast_var = fast[key]
        assert fast_mean.dtype == fast_var.dtype == torch.float32
        torch.testing.assert_close(fast_mean, mean, atol=0.02 * var.sqrt().max().item(), rtol=0)
        torch.testing.assert_close(fast_var, var, rtol=0.03, atol=0)
        differs |= not torch.equal(fast_var, var)
    assert differs, "the bf16 passes should not have run in fp32"


def test_statistics_autocast_leaves_half_precision_input_alone():
    assert isinstance(tiling.statistics_autocast(torch.zeros(1, dtype=torch.bfloat16)), contextlib.nullcontext)
    assert isinstance(tiling.statistics_autocast(torch.zeros(1, dtype=torch.float16)), contextlib.nullcontext)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_moments_over_bands_equal_the_whole_tensors_group_stats(channels_last):
    from codec.groupnorm import ChannelMoments, group_stats

    x = torch.randn(2, 12, 23, 7) * 3 + torch.linspace(-5, 5, 23).view(1, 1, 23, 1)  # rows differ in level
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    moments = ChannelMoments()
    for top, bottom in [(0, 1), (1, 1), (1, 9), (9, 20), (20, 23)]:  # an empty band too
        moments.update(x[:, :, top:bottom])
    mean, var = moments.group_stats(3)
    expected_mean, expected_var = group_stats(x, 3)
    torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(var, expected_var, atol=0, rtol=1e-5)


def test_the_output_norm_gets_exact_statistics_whatever_was_shared(vae):
    """The up blocks' statistics come from outside; the output norm's are measured over every row of its input.
    A wrong shared entry for the output norm changes nothing, and the result matches the exact tail."""
    z = torch.randn(1, 4, 12, 10)
    with torch.no_grad():
        features = vae.decode_head(z)
        exact = tiling.record_norm_stats(vae.decoder, vae.decoder.forward_tail, features)
        whole = vae.decoder.forward_tail(features)
        wrong = dict(exact)
        mean, var = exact["conv_norm_out"]
        wrong["conv_norm_out"] = (mean + 1.0, var * 4.0)
        with tiling.shared_norm_stats(vae.decoder, wrong):
            assert (vae.decoder.forward_tail(features) - whole).abs().max() > 1e-2  # the wrong entry matters
            streamed = streaming.stream_decoder_tail(vae.decoder, features, 3)
    torch.testing.assert_close(streamed, whole, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spill_reads_back_what_it_wrote_in_order(dtype):
    bands = [torch.randn(2, 5, rows, 6).to(dtype).contiguous(memory_format=torch.channels_last) for rows in (3, 0, 4)]
    with tempfile.TemporaryFile() as file:
        spill = streaming._Spill(file)
        for band in bands:
            spill.write(band)
        read = list(spill.read())
    assert len(read) == len(bands)
    for band, back in zip(bands, read, strict=True):
        assert back.dtype == dtype and back.shape == band.shape
        assert torch.equal(back, band)


def test_a_spill_file_cut_short_is_an_error_not_garbage(tmp_path):
    bands = [torch.randn(1, 3, 2, 5), torch.randn(1, 3, 1, 5)]
    with open(tmp_path / "spill", "w+b") as file:
        spill = streaming._Spill(file)
        for band in bands:
            spill.write(band)
        assert all(torch.equal(a, b) for a, b in zip(spill.read(), bands, strict=True))
        file.truncate(file.tell() - 4)
        with pytest.raises(RuntimeError, match="truncated"):
            list(spill.read())
