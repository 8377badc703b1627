"""The `codec` command, called in-process through codec.cli.main with a tiny model and small images."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import codec
from codec.cli import main
from codec.images import image_to_tensor, tensor_to_uint8
from codec.metrics import psnr, ssim

KODAK = Path("/work/shared/data/kodak")
# (stem, height, width): one size that is not a multiple of 8, so padding and cropping are exercised.
SOURCES = (("first", 40, 56), ("second", 64, 64), ("odd", 37, 45))
SUBCOMMANDS = ("encode", "decode", "roundtrip", "convert", "info")


def _source_array(index: int, height: int, width: int) -> np.ndarray:
    kodak = KODAK / f"kodim{index + 1:02d}.png"
    if kodak.is_file():
        with Image.open(kodak) as image:
            return np.asarray(image.convert("RGB"))[200 : 200 + height, 300 : 300 + width].copy()
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 40 * index)], axis=2)
    noise = np.random.default_rng(index).normal(0, 12, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, diffusers_vae) -> Path:
    """The `ours` model (tiny config, diffusers_vae's weights) saved as a diffusers folder, shared by the module."""
    model = codec.AutoencoderKL(tiny_config)
    model.load_state_dict(diffusers_vae.state_dict())
    folder = tmp_path_factory.mktemp("cli_model")
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_images")
    paths = {}
    for index, (stem, height, width) in enumerate(SOURCES):
        paths[stem] = folder / f"{stem}.png"
        Image.fromarray(_source_array(index, height, width)).save(paths[stem])
    return paths


def _run(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured here, for module-scoped fixtures where capsys is unavailable."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory, model_dir, sources):
    output = tmp_path_factory.mktemp("cli_roundtrip") / "out"
    code, stdout, stderr = _run(["roundtrip", *sources.values(), "--model", model_dir, "-o", output, "--device", "cpu"])
    assert code == 0, stderr
    return output, stdout


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image).copy()


# ---- roundtrip --------------------------------------------------------------------------------------------


def test_roundtrip_writes_reconstructions_comparisons_and_table(roundtrip, sources):
    output, _ = roundtrip
    for stem, height, width in SOURCES:
        reconstruction = _read_png(output / f"{stem}.png")
        assert reconstruction.shape == (height, width, 3)
        with Image.open(output / f"{stem}_compare.png") as comparison:
            # original, reconstruction and heat map side by side, with a label strip above
            assert comparison.width >= 3 * width and comparison.height > height
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [".codec-outputs.json", "metrics.csv"]
        + [f"{s}.png" for s, _, _ in SOURCES]
        + [f"{s}_compare.png" for s, _, _ in SOURCES]
    )
    with open(output / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == [f"{s}.png" for s, _, _ in SOURCES]
    for row, (stem, height, width) in zip(rows, SOURCES, strict=True):
        assert (int(row["width"]), int(row["height"])) == (width, height)
        expected = psnr(_read_png(sources[stem]), _read_png(output / f"{stem}.png")).item()
        assert float(row["psnr_db"]) == pytest.approx(expected, abs=1e-4)
        expected = ssim(_read_png(sources[stem]), _read_png(output / f"{stem}.png")).item()
        assert float(row["ssim"]) == pytest.approx(expected, abs=1e-5)


def test_roundtrip_prints_psnr_per_image(roundtrip, sources):
    output, stdout = roundtrip
    printed = dict(re.findall(r"^(\S+): PSNR ([\d.]+) dB", stdout, flags=re.MULTILINE))
    assert sorted(printed) == sorted(f"{s}.png" for s, _, _ in SOURCES), stdout
    for stem, _, _ in SOURCES:
        recomputed = psnr(_read_png(sources[stem]), _read_png(output / f"{stem}.png")).item()
        assert 5 < recomputed < 60
        assert float(printed[f"{stem}.png"]) == pytest.approx(recomputed, abs=0.0051)
    assert re.search(r"mean over 3 images: PSNR [\d.]+ dB", stdout)


def test_roundtrip_capsys_and_reconstruction_matches_model(tmp_path, model_dir, sources, capsys, ours):
    code = main(["roundtrip", str(sources["first"]), "--model", str(model_dir), "-o", str(tmp_path)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^first\.png: PSNR [\d.]+ dB", stdout, flags=re.MULTILINE), stdout
    # The written PNG is the `ours` model's reconstruction of the source, quantised to 8 bits.
    with torch.no_grad():
        expected = tensor_to_uint8(ours(image_to_tensor(sources["first"])).sample)[0]
    written = _read_png(tmp_path / "first.png")
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


# ---- encode / decode --------------------------------------------------------------------------------------


def test_encode_decode_matches_roundtrip(tmp_path, model_dir, sources, roundtrip):
    latents = tmp_path / "lat.safetensors"
    names = ["first", "odd"]
    code, stdout, stderr = _run(["encode", *(sources[n] for n in names), "-o", latents, "--model", model_dir])
    assert code == 0, stderr
    assert f"wrote 2 latents to {latents}" in stdout
    tensors = load_file(str(latents))
    assert sorted(tensors) == ["latent.0", "latent.1"]
    assert tensors["latent.0"].shape == (4, 5, 7)  # 40x56 / 8
    assert tensors["latent.1"].shape == (4, 5, 6)  # 37x45 padded to 40x48

    decoded = tmp_path / "decoded"
    code, _, stderr = _run(["decode", latents, "-o", decoded, "--model", model_dir])
    assert code == 0, stderr
    assert sorted(p.name for p in decoded.iterdir()) == [".codec-outputs.json", "first.png", "odd.png"]
    reference_dir, _ = roundtrip
    for stem, height, width in SOURCES:
        if stem not in names:
            continue
        image = _read_png(decoded / f"{stem}.png")
        assert image.shape == (height, width, 3)
        reference = _read_png(reference_dir / f"{stem}.png")
        difference = np.abs(image.astype(int) - reference.astype(int))
        # Scaling by 0.18215 and back changes the latent by float rounding only: at most one level, rarely.
        assert difference.max() <= 1
        assert (difference > 0).mean() < 0.01
        # ... which is far below the codec's own error.
        source = _read_png(sources[stem])
        assert np.abs(source.astype(int) - reference.astype(int)).mean() > 10 * difference.mean()


def test_encode_sample_is_seeded(tmp_path, model_dir, sources):
    def encode(name: str, *options: str) -> Path:
        path = tmp_path / name
        code, _, stderr = _run(["encode", sources["second"], "-o", path, "--model", model_dir, *options])
        assert code == 0, stderr
        return path

    first = encode("a.safetensors", "--sample", "--seed", "1")
    again = encode("b.safetensors", "--sample", "--seed", "1")
    other = encode("c.safetensors", "--sample", "--seed", "2")
    mean = encode("d.safetensors")
    # Same seed: the same tensors and metadata. (Not necessarily the same bytes: safetensors writes the
    # metadata entries in hash-map order, which changes from one call to the next.)
    assert _metadata(first) == _metadata(again)
    assert _metadata(first)["posterior"] == "sample" and _metadata(mean)["posterior"] == "mean"
    a, b, c, d = (load_file(str(p))["latent.0"] for p in (first, again, other, mean))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_decode_rejects_a_file_that_is_not_latents(tmp_path, model_dir, capsys):
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    code = main(["decode", str(weights), "-o", str(tmp_path / "x"), "--model", str(model_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "Traceback" not in err


def test_decode_names_latents_metadata_that_does_not_describe_the_tensors(tmp_path, model_dir, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    image = tmp_path / "a.png"
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(image)
    latents = tmp_path / "z.safetensors"
    assert main(["encode", str(image), "-o", str(latents), "--model", str(model_dir)]) == 0
    with safe_open(str(latents), "pt") as handle:
        tensor, metadata = handle.get_tensor("latent.0"), handle.metadata()
    cases = {
        "sources": ({"sources": "[1]"}, tensor),
        "sizes": ({"sizes": "[]"}, tensor),
        "latent.0 is not": ({"sizes": "[[-16, 24]]"}, tensor),
        "NaN or infinite": ({}, torch.full_like(tensor, float("nan"))),
        "larger than its latent decodes": ({"sizes": "[[160, 24]]"}, tensor),
        "over the limit": ({"sizes": "[[16, 24]]"}, torch.zeros(4, 2000, 2000)),
    }
    capsys.readouterr()
    for expected, (changes, values) in cases.items():
        edited = tmp_path / f"edited-{len(expected)}.safetensors"
        save_file({"latent.0": values}, str(edited), metadata={**metadata, **changes})
        out = tmp_path / f"out-{len(expected)}"
        assert main(["decode", str(edited), "-o", str(out), "--model", str(model_dir)]) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and str(edited) in err and "Traceback" not in err
        assert not out.exists()  # nothing written before the refusal
    assert json.loads(metadata["sizes"]) == [[16, 24]]


# ---- convert / info ---------------------------------------------------------------------------------------


def test_convert_folder_to_file_and_back(tmp_path, model_dir, assert_same_tensors):
    single = tmp_path / "vae.safetensors"
    code, stdout, stderr = _run(["convert", model_dir, single])
    assert code == 0, stderr
    assert single.is_file() and str(single) in stdout
    back = tmp_path / "back"
    code, _, stderr = _run(["convert", single, back, "--config", model_dir / "config.json"])
    assert code == 0, stderr
    original = load_file(str(model_dir / "diffusion_pytorch_model.safetensors"))
    converted = load_file(str(back / "diffusion_pytorch_model.safetensors"))
    assert_same_tensors(original, converted)
    assert json.loads((back / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    code, _, stderr = _run(["convert", model_dir, tmp_path / "vae.pt"])  # torch's other suffixes: a single file
    assert code == 0 and (tmp_path / "vae.pt").is_file(), stderr


def test_convert_refuses_what_it_would_do_wrong(tmp_path, model_dir):
    code, _, stderr = _run(["convert", model_dir, tmp_path / "vae.bin"])  # would have become a folder so named
    assert code == 2 and "vae.bin: .bin is not a format written here" in stderr and not (tmp_path / "vae.bin").exists()
    code, _, stderr = _run(["convert", model_dir, tmp_path / "out", "--config", "sdxl"])  # would have been ignored
    assert code == 2 and "--config sdxl: only for a single-file source" in stderr and not (tmp_path / "out").exists()


def test_info_json(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--size", "256", "256", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latent_shape"] == [4, 32, 32]
    assert info["image_size"] == [256, 256]
    assert info["values_ratio"] == pytest.approx(3 * 256 * 256 / (4 * 32 * 32))
    assert info["config"]["block_out_channels"] == [32, 64, 64, 64]
    total = sum(p.numel() for p in codec.AutoencoderKL(codec.preset("tiny")).parameters())
    assert info["parameters"]["total"] == total


def test_info_text(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--size", "64", "96"]) == 0
    out = capsys.readouterr().out
    assert "latent (4, 8, 12)" in out
    assert "scaling factor 0.18215" in out


def test_preset_model(tmp_path, sources, capsys):
    assert main(["info", "--model", "preset:tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latent_shape"] == [4, 64, 64]
    code = main(["roundtrip", str(sources["first"]), "--model", "preset:tiny", "-o", str(tmp_path)])
    assert code == 0
    assert _read_png(tmp_path / "first.png").shape == (40, 56, 3)


# ---- errors -----------------------------------------------------------------------------------------------


def _assert_one_line_error(capsys, command: str, names: Path) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"codec {command}: error: "), err
    assert str(names) in lines[0], err
    return lines[0]


def test_missing_image(tmp_path, model_dir, capsys):
    missing = tmp_path / "missing.png"
    assert main(["roundtrip", str(missing), "--model", str(model_dir), "-o", str(tmp_path / "o")]) == 2
    _assert_one_line_error(capsys, "roundtrip", missing)
    assert main(["encode", str(missing), "--model", str(model_dir), "-o", str(tmp_path / "l.safetensors")]) == 2
    _assert_one_line_error(capsys, "encode", missing)
    assert not (tmp_path / "l.safetensors").exists()


def test_corrupt_image(tmp_path, model_dir, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_text("not a png at all\n")
    assert main(["roundtrip", str(corrupt), "--model", str(model_dir), "-o", str(tmp_path / "o")]) == 2
    _assert_one_line_error(capsys, "roundtrip", corrupt)


def test_missing_model_folder(tmp_path, sources, capsys):
    missing = tmp_path / "no_model_here"
    assert main(["roundtrip", str(sources["first"]), "--model", str(missing), "-o", str(tmp_path / "o")]) == 2
    _assert_one_line_error(capsys, "roundtrip", missing)
    assert main(["info", "--model", str(missing)]) == 2
    _assert_one_line_error(capsys, "info", missing)


def test_corrupt_model_file(tmp_path, sources, model_dir, capsys):
    bad_file = tmp_path / "bad.safetensors"
    bad_file.write_bytes(b"\x00garbage" * 64)
    assert main(["roundtrip", str(sources["first"]), "--model", str(bad_file), "-o", str(tmp_path / "o")]) == 2
    _assert_one_line_error(capsys, "roundtrip", bad_file)

    # A diffusers folder whose weights file was cut short.
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    weights = (model_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert main(["info", "--model", str(folder)]) == 2
    _assert_one_line_error(capsys, "info", folder / "diffusion_pytorch_model.safetensors")


# ---- help and the console script --------------------------------------------------------------------------


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"codec {command}" in capsys.readouterr().out


def test_top_level_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out
    with pytest.raises(SystemExit) as exit_info:
        main([])  # a subcommand is required
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["roundtrip"])  # images and -o are required
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("command", "default"),
    [
        ("roundtrip", "default: 'builtin'"),
        ("decode", "default: the model the file records"),
        ("cache", "default: none, required (`--model builtin` names the embedded one)"),
        ("cache verify", "default: the codec is not checked"),
        ("stats", "statistics need no model"),
    ],
)
def test_help_says_what_a_left_out_model_means(command, default, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert default in " ".join(capsys.readouterr().out.split())


def test_console_script_help():
    script = Path(sys.executable).parent / "codec"
    if not script.is_file():
        pytest.skip(f"{script} is not installed")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "roundtrip" in result.stdout


# ---- output and argument errors ------------------------------------------------------------------------


def test_output_folder_that_is_a_file(tmp_path, sources, model_dir, capsys):
    occupied = tmp_path / "occupied"
    occupied.write_text("a file, not a folder")
    assert main(["roundtrip", str(sources["first"]), "--model", str(model_dir), "-o", str(occupied)]) == 2
    _assert_one_line_error(capsys, "roundtrip", occupied)


def test_info_rejects_empty_size(model_dir, capsys):
    try:
        code = main(["info", "--model", str(model_dir), "--size", "0", "0"])
    except SystemExit as exit_info:  # argparse refusing the value is as good as a plain error
        code = exit_info.code
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err
