"""The file commands given awkward input sets: inputs whose names clash, images too small for SSIM, and device
names that do not exist here."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from codec.cli import main
from codec.cli.common import output_stems


def _image(path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)


@pytest.fixture
def clashing(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "one" / "x.png", tmp_path / "two" / "x.png"]
    for seed, path in enumerate(paths):
        _image(path, 32, 40 + 8 * seed, seed)
    _image(tmp_path / "tiny.png", 8, 10, 9)
    return [*paths, tmp_path / "tiny.png"]


def test_output_stems_are_unique_and_stay_readable():
    names = ["a.png", "a.jpg", "one/x.png", "two/x.png", "b.png"]
    assert output_stems(names) == ["a_png", "a_jpg", "x-1", "x-2", "b"]


def test_decode_and_roundtrip_write_one_file_per_input(clashing, tmp_path, capsys):
    model = ["--model", "preset:tiny", "--device", "cpu"]
    assert main(["roundtrip", *map(str, clashing), "-o", str(tmp_path / "rt"), *model]) == 0
    written = sorted(p.name for p in (tmp_path / "rt").glob("*.png") if not p.name.endswith("_compare.png"))
    assert written == ["a_jpg.png", "a_png.png", "tiny.png", "x-1.png", "x-2.png"]
    with (tmp_path / "rt" / "metrics.csv").open() as file:
        ssim = {row["image"]: row["ssim"] for row in csv.DictReader(file)}
    assert ssim["tiny.png"] == "" and float(ssim["a.png"]) > -1  # under SSIM's 11-pixel window: no value
    assert "tiny.png: PSNR" in capsys.readouterr().out

    latents = tmp_path / "latents.safetensors"
    assert main(["encode", *map(str, clashing), "-o", str(latents), *model]) == 0
    assert main(["decode", str(latents), "-o", str(tmp_path / "decoded"), *model]) == 0
    decoded = {p.name: Image.open(p).size for p in (tmp_path / "decoded").glob("*.png")}
    assert decoded == {"a_png.png": (40, 32), "a_jpg.png": (48, 32), "x-1.png": (56, 32), "x-2.png": (64, 32),
                       "tiny.png": (10, 8)}  # fmt: skip


@pytest.mark.parametrize(("device", "reason"), [("foo", "not a device name"), ("meta", "hold no data"),
                                                ("mps", "not available")])  # fmt: skip
def test_a_device_that_cannot_be_used_is_a_plain_error(device, reason, clashing, tmp_path, capsys):
    args = ["encode", str(clashing[0]), "-o", str(tmp_path / "z.safetensors"), "--model", "preset:tiny"]
    assert main([*args, "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}" in err and reason in err and "Traceback" not in err


def test_encode_checks_every_input_and_its_output_before_encoding(clashing, tmp_path, capsys):
    model = ["--model", "preset:tiny", "--device", "cpu"]
    args = ["encode", str(clashing[0]), str(tmp_path / "gone.png"), str(tmp_path / "one"), *model]
    assert main([*args, "-o", str(tmp_path / "z.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "cannot read 2 input(s)" in err and "gone.png (no such file)" in err and "one (a folder)" in err
    assert main(["encode", str(clashing[0]), "-o", str(tmp_path), *model]) == 2
    assert "is a folder; -o takes the .safetensors file" in capsys.readouterr().err
    assert main(["roundtrip", str(tmp_path / "one"), "-o", str(tmp_path / "rt"), *model]) == 2
    assert "one: is a folder, not an image file" in capsys.readouterr().err
    assert main(["decode", str(clashing[0]), "-o", str(tmp_path / "d"), *model]) == 2  # a PNG is not latents
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "a.png: not a latents file written by `codec encode`" in err
    assert "weights_only" not in err  # torch's advice on unsafe loading is no help here
    assert main(["encode", str(clashing[0]), "-o", str(tmp_path / "z.png"), *model]) == 2
    assert "name the file -o NAME.safetensors" in capsys.readouterr().err
    assert main(["encode", str(clashing[0]), "-o", str(tmp_path / "z.safetensors"), "--seed", "3", *model]) == 2
    assert "--seed seeds --sample" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "one"), "--channel-stats", *model]) == 2
    assert "--channel-stats says what --write-config DIR writes" in capsys.readouterr().err


def test_decode_uses_the_model_the_file_records_and_refuses_latents_of_another_shape(clashing, tmp_path, capsys):
    import dataclasses

    import codec

    tiny = codec.AutoencoderKL.load("preset:tiny")
    folder = tmp_path / "mine"
    with torch.no_grad():
        tiny.decoder.conv_out.bias += 0.5  # not the builtin, nor the preset: only this folder decodes it rightly
    tiny.save_pretrained(folder)
    latents = tmp_path / "z.safetensors"
    assert main(["encode", str(clashing[0]), "-o", str(latents), "--model", str(folder), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["decode", str(latents), "-o", str(tmp_path / "recorded"), "--device", "cpu"]) == 0
    assert f"decoding with {folder}, the model that encoded" in capsys.readouterr().out
    relative = tmp_path / "relative.safetensors"  # a model named relative to where encode ran: recorded absolute
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert main(["encode", str(clashing[0]), "-o", str(relative), "--model", "mine", "--device", "cpu"]) == 0
    assert main(["decode", str(relative), "-o", str(tmp_path / "from-elsewhere"), "--device", "cpu"]) == 0
    assert f"decoding with {folder}," in capsys.readouterr().out
    assert main(["decode", str(latents), "-o", str(tmp_path / "named"), "--model", str(folder)]) == 0
    recorded, named = (np.asarray(Image.open(tmp_path / d / "a.png")) for d in ("recorded", "named"))
    assert np.array_equal(recorded, named)

    wide = tmp_path / "wide"
    codec.AutoencoderKL(dataclasses.replace(tiny.config, latent_channels=16, use_quant_conv=False)).save_pretrained(
        wide
    )
    assert main(["decode", str(latents), "-o", str(tmp_path / "w"), "--model", str(wide), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"latents of 4 channels (encoded with {folder}), but {wide} decodes 16" in err
    assert main(["decode", str(latents), "-o", str(latents), "--model", str(folder)]) == 2
    assert "is a file; -o takes the folder" in capsys.readouterr().err


def test_latents_of_a_model_with_per_channel_statistics_are_scaled_and_unscaled_with_them(clashing, tmp_path, capsys):
    import dataclasses

    from safetensors.torch import load_file

    import codec
    from codec.images import image_to_tensor

    tiny = codec.AutoencoderKL.load("preset:tiny")
    mean, std = (0.5, -0.25, 0.1, 0.0), (2.0, 0.5, 1.5, 1.0)
    config = dataclasses.replace(tiny.config, scaling_factor=0.5, latents_mean=mean, latents_std=std)
    folder = tmp_path / "playground-like"
    model = codec.AutoencoderKL(config).eval()
    model.load_state_dict(tiny.state_dict())
    model.save_pretrained(folder)
    latents = tmp_path / "z.safetensors"
    assert main(["encode", str(clashing[0]), "-o", str(latents), "--model", str(folder), "--device", "cpu"]) == 0
    with torch.no_grad():
        z = model.encode(image_to_tensor(clashing[0])).latent_dist.mode()
    # As diffusers' SDXL pipelines scale when latents_mean/std are set.
    expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) * 0.5 / torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(load_file(latents)["latent.0"], expected[0], atol=1e-5, rtol=1e-5)
    assert main(["decode", str(latents), "-o", str(tmp_path / "decoded"), "--device", "cpu"]) == 0
    assert main(["roundtrip", str(clashing[0]), "-o", str(tmp_path / "direct"), "--model", str(folder)]) == 0
    decoded, direct = (np.asarray(Image.open(tmp_path / d / "a.png")).astype(int) for d in ("decoded", "direct"))
    assert np.abs(decoded - direct).max() <= 1  # scaled and unscaled with the same statistics
    assert "warning" not in capsys.readouterr().out


def test_per_channel_scaling_takes_one_latent_or_a_batch():
    import dataclasses

    import codec

    config = dataclasses.replace(codec.preset("tiny"), latents_mean=(1.0, 2.0, 3.0, 4.0), latents_std=(1, 2, 4, 8))
    vae = codec.AutoencoderKL(config)
    z = torch.randn(2, 4, 4, 4)  # h == C: scaling along the wrong dimension would go unnoticed by shapes
    batch = vae.scale_latents(z)
    torch.testing.assert_close(vae.scale_latents(z[1]), batch[1])  # a LatentDataset item's (C, h, w)
    assert torch.allclose(batch[:, 3], (z[:, 3] - 4.0) * config.scaling_factor / 8)
    torch.testing.assert_close(vae.unscale_latents(batch), z)
    with pytest.raises(ValueError, match=r"expected \(C, h, w\) or \(B, C, h, w\)"):
        vae.scale_latents(torch.randn(1, 4, 4, 4, 4))  # a video's (B, C, T, h, w) would be scaled along T


def test_roundtrip_into_the_inputs_folder_refuses_to_replace_them(tmp_path, capsys):
    image = tmp_path / "a.png"
    _image(image, 16, 16, 0)
    before = image.read_bytes()
    assert main(["roundtrip", str(image), "-o", str(tmp_path), "--model", "preset:tiny"]) == 2
    assert "would replace input image(s)" in capsys.readouterr().err and image.read_bytes() == before


def test_decode_into_the_folder_the_images_were_encoded_from_refuses_to_replace_them(tmp_path, capsys):
    image = tmp_path / "a.png"
    _image(image, 16, 16, 0)
    before = image.read_bytes()
    latents = tmp_path / "z.safetensors"
    assert main(["encode", str(image), "-o", str(latents), "--model", "preset:tiny"]) == 0
    assert main(["decode", str(latents), "-o", str(tmp_path), "--model", "preset:tiny"]) == 2
    assert "would replace the encoded image(s)" in capsys.readouterr().err and image.read_bytes() == before
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)  # the same folder by another name
    assert main(["decode", str(latents), "-o", str(tmp_path / "link"), "--model", "preset:tiny"]) == 2
    assert str(tmp_path) not in latents.read_bytes().decode("latin-1")  # no folder or user names recorded
    assert main(["decode", str(latents), "-o", str(tmp_path / "out"), "--model", "preset:tiny"]) == 0
    assert (tmp_path / "out" / "a.png").is_file()


def test_outputs_that_are_files_and_seeds_out_of_range_are_said_before_any_work(tmp_path, capsys):
    image = tmp_path / "a.png"
    _image(image, 16, 16, 0)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for command in (["roundtrip", str(image)], ["demo"]):
        assert main([*command, "-o", str(afile), "--model", "preset:tiny"]) == 2  # had been a bare [Errno 17]
        assert f"{afile}: is a file; -o takes the folder" in capsys.readouterr().err
    z = str(tmp_path / "z.safetensors")
    assert main(["encode", str(image), "-o", z, "--sample", "--seed", str(10**23), "--model", "preset:tiny"]) == 2
    assert "--seed must be from" in capsys.readouterr().err  # had been "Overflow when unpacking long long"


def test_a_demo_with_an_unreadable_photo_writes_nothing(tmp_path, capsys):
    good, bad = tmp_path / "a.png", tmp_path / "b.png"
    _image(good, 16, 16, 0)
    bad.write_bytes(b"not a png")
    assert main(["demo", str(good), str(bad), "-o", str(tmp_path / "demo"), "--model", "preset:tiny"]) == 2
    assert str(bad) in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_roundtrip_reads_every_input_before_replacing_any_output(clashing, tmp_path, capsys):
    model = ["--model", "preset:tiny", "--device", "cpu"]
    out = tmp_path / "rt"
    out.mkdir()
    (out / "a_png.png").write_bytes(b"an earlier run's output")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["roundtrip", str(clashing[0]), str(clashing[1]), str(corrupt), "-o", str(out), *model, "--overwrite"]
    assert main(args) == 2
    assert "corrupt.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a_png.png"]
    assert (out / "a_png.png").read_bytes() == b"an earlier run's output"


def test_roundtrip_takes_a_file_name_that_is_not_utf8(clashing, tmp_path, capsys):
    latin1 = tmp_path / os.fsdecode(b"caf\xe9.png")
    latin1.write_bytes(clashing[0].read_bytes())
    out = tmp_path / "rt"
    assert main(["roundtrip", str(latin1), str(clashing[2]), "-o", str(out), "--model", "preset:tiny"]) == 0
    assert "caf\ufffd.png: PSNR" in capsys.readouterr().out
    with (out / "metrics.csv").open(encoding="utf-8") as file:
        assert [row["image"] for row in csv.DictReader(file)] == ["caf\ufffd.png", "x.png"]
    assert (out / os.fsdecode(b"caf\xe9.png")).is_file()


def test_roundtrip_tile_sets_the_tile_size(clashing, tmp_path, capsys):
    # --tile had enabled the budget's tile, under which any image that fits runs whole: it changed nothing.
    model = [str(clashing[3]), "--model", "preset:tiny", "--device", "cpu"]  # 64x32
    outputs = {}
    for name, tile in (("whole", []), ("bare", ["--tile"]), ("small", ["--tile-size", "2"])):
        assert main(["roundtrip", *model, "-o", str(tmp_path / name), *tile]) == 0
        outputs[name] = np.array(Image.open(tmp_path / name / "x.png"))
    assert np.array_equal(outputs["whole"], outputs["bare"])  # 64 latent positions: one tile, run whole
    assert not np.array_equal(outputs["whole"], outputs["small"])
    assert main(["roundtrip", "--tile", *model, "-o", str(tmp_path / "first")]) == 0  # --tile before the images
    assert main(["roundtrip", *model, "-o", str(tmp_path / "one"), "--tile-size", "1"]) == 2
    assert "--tile-size takes a tile side of at least 2 latent positions, got 1" in capsys.readouterr().err


def test_dtype_runs_the_model_in_that_precision(clashing, tmp_path, monkeypatch):
    import argparse

    from codec.cli import common, roundtrip
    from codec.metrics import psnr

    args = argparse.Namespace(model="preset:tiny", device="cpu", dtype="bf16")
    assert common.load_model(args).dtype == torch.bfloat16
    loaded = []
    monkeypatch.setattr(roundtrip, "load_model", lambda a, **kw: loaded.append(a.dtype) or common.load_model(a, **kw))
    for dtype in ("fp32", "bf16"):
        args = ["roundtrip", str(clashing[0]), "-o", str(tmp_path / dtype), "--model", "preset:tiny", "--dtype", dtype]
        assert main(args) == 0
    assert loaded == ["fp32", "bf16"]
    fp32, bf16 = (np.array(Image.open(tmp_path / d / "a.png")) for d in ("fp32", "bf16"))
    assert 30 < psnr(fp32, bf16).item() < float("inf")  # close, and not the fp32 model again


def test_info_on_the_embedded_model_begins_with_its_story(capsys):
    from codec.builtin import BUILTIN_DIR

    assert main(["info"]) == 0  # --model left out: builtin
    about = (BUILTIN_DIR / "ABOUT.md").read_text().strip().splitlines()
    out = capsys.readouterr().out
    assert out.startswith(about[0]) and "model: builtin" in out
