"""Other diffusers autoencoders run through diffusers' own classes: the same latents and images as the class
itself gives, `codec roundtrip` and `codec bench` with a TAESD folder, rates from each model's own geometry, and a
clear refusal of a class that is not supported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codec.checkpoint import CheckpointError
from codec.cli import main
from codec.foreign import SUPPORTED, load_foreign

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"

# Seeded tiny instances: (constructor arguments, latent channels, factor).
TINY = {
    "AutoencoderTiny": (
        dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1,) * 4,
             num_decoder_blocks=(1,) * 4, latent_channels=4),
        4, 8,
    ),
    "AutoencoderDC": (
        dict(latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
             decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
             decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
             encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
             upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu"),
        4, 2,
    ),
    "AutoencoderKLQwenImage": (
        dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
        4, 8,
    ),
    "ConsistencyDecoderVAE": (
        dict(encoder_block_out_channels=(8, 8), encoder_down_block_types=("DownEncoderBlock2D",) * 2,
             encoder_layers_per_block=1, encoder_norm_num_groups=4, decoder_block_out_channels=(8, 16),
             decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2, decoder_layers_per_block=1,
             decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2, decoder_norm_num_groups=4),
        4, 2,
    ),
}  # fmt: skip


def _save(name: str, folder: Path) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, name)(**TINY[name][0]).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("taesd")
    _save("AutoencoderTiny", folder)
    return folder


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_folder_runs_through_diffusers_own_class(name, tmp_path):
    assert name in SUPPORTED
    theirs = _save(name, tmp_path)
    mine = load_foreign(tmp_path)
    channels, factor = TINY[name][1:]
    assert (mine.class_name, mine.latent_channels, mine.downsample_factor) == (name, channels, factor)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    video = name == "AutoencoderKLQwenImage"  # one frame of a video autoencoder
    with torch.no_grad():
        z = mine.encode_latent(x)
        assert z.shape == (2, channels, 32 // factor, 48 // factor)
        out = theirs.encode(x[:, :, None] if video else x)
        expected = out.latent_dist.mode() if hasattr(out, "latent_dist") else getattr(out, "latents", None)
        expected = out.latent if expected is None else expected
        torch.testing.assert_close(z, expected[:, :, 0] if video else expected, rtol=0, atol=1e-6)
        decoded = mine.decode_latent(z)
        assert decoded.shape == x.shape and torch.isfinite(decoded).all()
        if name == "ConsistencyDecoderVAE":  # a diffusion decoder: seeded, so two decodes agree
            assert torch.equal(decoded, mine.decode_latent(z))
        else:
            direct = theirs.decode(z[:, :, None] if video else z).sample
            torch.testing.assert_close(decoded, direct[:, :, 0] if video else direct, rtol=0, atol=1e-6)


def test_an_unsupported_class_is_refused_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLLTXVideo"}))
    with pytest.raises(CheckpointError, match=r"'AutoencoderKLLTXVideo', which .* do not run; .*AutoencoderTiny"):
        load_foreign(tmp_path)
    image = _images(tmp_path / "images", 1) / "im0.png"
    code = main(["roundtrip", str(image), "-o", str(tmp_path / "out"), "--model", str(tmp_path)])
    assert code != 0 and not (tmp_path / "out").exists()
    code = main(["bench", "--model", str(tmp_path), "--data", str(image), "-o", str(tmp_path / "bench"), "--no-fid"])
    assert code != 0 and not (tmp_path / "bench" / "summary.json").exists()


def _images(folder: Path, count: int = 3) -> Path:
    """Crops of Kodak photos (gradients where the set is absent), sides multiples of 8 and one that is not."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate([(64, 64), (48, 80), (44, 60)][:count]):
        path = KODAK / f"kodim{index + 1:02d}.png"
        if path.is_file():
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))[100 : 100 + height, 200 : 200 + width]
        else:
            y, x = np.mgrid[0:height, 0:width]
            array = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 60 * index)], 2).astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"im{index}.png")
    return folder


def test_roundtrip_with_a_taesd_folder(taesd_folder, tmp_path):
    images = _images(tmp_path / "images", 1)
    assert main(["roundtrip", str(images / "im0.png"), "-o", str(tmp_path / "out"), "--model", str(taesd_folder)]) == 0
    with Image.open(tmp_path / "out" / "im0.png") as image:
        assert image.size == (64, 64)
    assert "im0.png" in (tmp_path / "out" / "metrics.csv").read_text()


def test_bench_a_taesd_folder_beside_builtin_and_bicubic(taesd_folder, tmp_path):
    images = _images(tmp_path / "images")
    output = tmp_path / "bench"
    models = ["--model", str(taesd_folder), "--model", "builtin", "--model", "bicubic", "--model", "preset:flux2-tiny"]
    options = ["--protocol", "full", "--no-fid", "--no-lpips", "--classic", "jpeg", "-o", str(output)]
    assert main(["bench", *models, "--data", str(images), *options]) == 0
    rows = {row["name"]: row for row in json.loads((output / "summary.json").read_text())["rows"]}
    # Two latent geometries (f8c4: TAESD and builtin; FLUX.2's): bicubic once at each, named by its first model.
    bicubic = {f"bicubic@{taesd_folder.name}", "bicubic@preset-flux2-tiny"}
    assert {taesd_folder.name, "builtin", *bicubic, f"jpeg@{taesd_folder.name}"} <= set(rows)
    assert rows[f"bicubic@{taesd_folder.name}"]["matched_to"] == [taesd_folder.name, "builtin"]
    assert "diffusers AutoencoderTiny" in rows[taesd_folder.name]["description"]
    assert "diffusers" not in rows["builtin"]["description"]  # our own model keeps its native path
    # Bits per pixel from each model's own geometry, fp16 latents: TAESD and builtin store 4 values per 64 pixels,
    # over the padded latent of the 44x60 image (6x8 latent positions for 2640 pixels).
    pixels = [64 * 64, 48 * 80, 44 * 60]
    latent_values = [8 * 8, 6 * 10, 6 * 8]
    expected = float(np.mean([4 * 16 * v / p for v, p in zip(latent_values, pixels, strict=True)]))
    assert rows[taesd_folder.name]["bpp"] == pytest.approx(expected)
    assert rows["builtin"]["bpp"] == pytest.approx(expected)
    # FLUX.2's geometry: its (here 8-channel) f8 latent in 2x2 patches, the image padded to a multiple of 16.
    flux2_values = [8 * 8 * 8, 8 * 6 * 10, 8 * 6 * 8]
    flux2 = float(np.mean([16 * v / p for v, p in zip(flux2_values, pixels, strict=True)]))
    assert rows["preset-flux2-tiny"]["bpp"] == pytest.approx(flux2)
    assert all(rows[name]["bpp"] > 0 for name in rows)
    markdown = (output / "summary.md").read_text()
    assert f"| {taesd_folder.name} | vae |" in markdown and "| builtin | vae |" in markdown
