"""`codec bench` end to end with a tiny random model on a few small images: every output, and its numbers
checked against scikit-image on the PNGs the bench saved."""

from __future__ import annotations

import csv
import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codec
from codec.bench import rate
from codec.cli import main

KODAK = Path("/work/shared/data/kodak")
SIZES = ((64, 64), (64, 64), (44, 60))  # (height, width); one not a multiple of 8, and a size change mid-batch


def _photo(index: int, height: int, width: int) -> np.ndarray:
    path = KODAK / f"kodim{index + 1:02d}.png"
    if path.is_file():
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[200 : 200 + height, 300 : 300 + width].copy()
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 50 * index)], axis=2)
    return np.clip(base + np.random.default_rng(index).normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vae")
    codec.AutoencoderKL(codec.preset("tiny")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for index, (height, width) in enumerate(SIZES):
        Image.fromarray(_photo(index, height, width)).save(folder / f"im{index}.png")
    return folder


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, model_dir, data_dir):
    """One bench run with FID (offline, real Inception) and LPIPS made to fail as it does offline."""
    import torchvision.models._api as api

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: refused {url}")

    output = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(output.parent / "torch-home"))
        patch.setattr(api, "load_state_dict_from_url", refuse)
        args = ["bench", "--model", str(model_dir), "--model", "bicubic", "--data", str(data_dir)]
        code = main([*args, "--protocol", "full", "--classic", "jpeg", "--batch-size", "2", "-o", str(output)])
    assert code == 0
    return output, json.loads((output / "summary.json").read_text())


def _csv(output: Path) -> list[dict]:
    with (output / "per_image.csv").open() as file:
        return list(csv.DictReader(file))


def test_every_output_is_written(bench_run, model_dir):
    output, summary = bench_run
    assert [row["name"] for row in summary["rows"]] == [model_dir.name, "bicubic", f"jpeg@{model_dir.name}"]
    for name in ("summary.md", "per_image.csv"):
        assert (output / name).stat().st_size > 0
    assert sorted(summary["plots"]) == [
        "plots/psnr_per_image.png",
        "plots/psnr_vs_bpp.png",
        "plots/quality_vs_speed.png",
    ]
    # Two best and two worst of three images would show one twice: best-1, best-2 and worst-1.
    assert [Path(p).name.rsplit("-", 1)[0] for p in summary["grids"]] == ["best-1", "best-2", "worst-1"]
    assert len({Path(p).name.rsplit("-", 1)[1] for p in summary["grids"]}) == 3
    for relative in summary["plots"] + summary["grids"]:
        with Image.open(output / relative) as image:
            assert image.width > 100
    with Image.open(output / summary["grids"][0]) as grid:
        assert grid.width >= 4 * 60  # original + three reconstructions side by side
    markdown = (output / "summary.md").read_text()
    assert "| bicubic | baseline |" in markdown and "codec bench --model" in markdown
    assert len(_csv(output)) == 3 * len(SIZES)


def test_per_image_psnr_and_ssim_match_skimage_on_the_saved_pngs(bench_run):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    output, _ = bench_run
    for record in _csv(output):
        with Image.open(output / "reference" / f"{record['image']}.png") as a:
            reference = np.asarray(a)
        with Image.open(output / "reconstructions" / record["model"] / f"{record['image']}.png") as b:
            recon = np.asarray(b)
        assert float(record["psnr"]) == pytest.approx(
            peak_signal_noise_ratio(reference, recon, data_range=255), abs=1e-9
        )
        expected_ssim = structural_similarity(
            reference,
            recon,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        assert float(record["ssim"]) == pytest.approx(expected_ssim, abs=1e-4)


def test_rate_is_that_of_the_stored_latent(bench_run, model_dir):
    output, summary = bench_run
    for record in _csv(output):
        height, width = int(record["height"]), int(record["width"])
        if record["model"] == model_dir.name:  # 4 channels, ceil(side / 8), 16 bits
            expected = 4 * math.ceil(height / 8) * math.ceil(width / 8) * 16 / (height * width)
            assert float(record["bpp"]) == pytest.approx(expected)
        elif record["kind"] == "classic":
            assert record["rate_met"] == "True" and float(record["bpp"]) <= float(record["target_bpp"])
    assert summary["rows"][2]["matched_to"] == [model_dir.name]


def test_unavailable_lpips_rfid_and_notes(bench_run, model_dir):
    output, summary = bench_run
    for net in ("alex", "vgg"):
        assert summary["lpips"][net]["computed"] is False
        assert "offline test" in summary["lpips"][net]["reason"]
    assert "unavailable" in (output / "summary.md").read_text()
    assert all(row["lpips_alex"] is None and row["lpips_vgg"] is None for row in summary["rows"])
    rfid = {row["name"]: row["rfid"] for row in summary["rows"]}  # tiny-vae0 653, bicubic 519, jpeg 441 here
    # Each model's reconstructions against the references: the random-weight codec's noise is far from them, and
    # every model's distance is positive (a reference set against itself would give 0 to all).
    assert all(value is not None and value > 0 for value in rfid.values()), rfid
    assert rfid[model_dir.name] > max(value for name, value in rfid.items() if name != model_dir.name), rfid
    assert "biased" in summary["notes"]["rfid"]
    assert "176" in summary["notes"]["ms_ssim"] and all(row["ms_ssim"] is None for row in summary["rows"])
    for row in summary["rows"]:
        assert row["encode_images_per_s"] > 0 and row["decode_images_per_s"] > 0 and row["peak_memory_mb"] >= 0
    codec_row = next(row for row in summary["rows"] if row["name"] == model_dir.name)
    if "VmHWM" in codec_row["memory_method"]:  # Linux's resettable peak: the codec's activations show (19-22 MB)
        assert codec_row["peak_memory_mb"] > 2, codec_row


def test_uint8_latents_are_quantised_before_decoding(tmp_path, model_dir, data_dir):
    output = tmp_path / "out"
    args = ["bench", "--model", str(model_dir), "--data", str(data_dir), "--limit", "1", "--protocol", "crop256"]
    flags = ["--latent-precision", "uint8", "--classic", "none", "--no-fid", "--no-lpips", "--grid-images", "0"]
    assert main([*args, *flags, "-o", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["images"] == 1 and summary["image_sizes"] == [[256, 256]]
    assert summary["rows"][0]["bpp"] == pytest.approx(0.5 + 4 * 64 / 256**2)
    vae = codec.AutoencoderKL.from_pretrained(model_dir).eval()
    with Image.open(output / "reference" / "im0.png") as image:
        x = (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1).contiguous()
    with torch.no_grad():
        latents = vae.encode_latents(x)
        stored = rate.load(rate.store(latents, "uint8"))
        expected = codec.images.tensor_to_uint8(vae.decode_latents(stored))[0]
    with Image.open(output / "reconstructions" / model_dir.name / "im0.png") as image:
        saved = np.asarray(image)
    # The same computation, in the same memory layout: equal to the level (a random decoder amplifies any
    # difference in the latent's last bits, which is why the stored latent has to be the one decoded).
    assert np.array_equal(saved, expected)


def test_a_rerun_into_the_same_folder_replaces_the_earlier_benchmark(tmp_path, model_dir, data_dir):
    output = tmp_path / "out"
    common = ["--data", str(data_dir), "--limit", "1", "--classic", "none", "--no-fid", "--no-lpips", "-o", str(output)]
    assert main(["bench", "--model", str(model_dir), *common]) == 0
    (output / "notes.txt").write_text("mine")
    assert (output / "reconstructions" / model_dir.name).is_dir()
    assert main(["bench", "--model", "bicubic", "--model", str(tmp_path / "typo"), *common]) == 2  # refused...
    assert (output / "reconstructions" / model_dir.name).is_dir()  # ...and the earlier results are still there
    assert main(["bench", "--model", "bicubic", *common]) == 0
    assert sorted(p.name for p in (output / "reconstructions").iterdir()) == ["bicubic"]
    assert not (output / ".previous-benchmark").exists()
    assert (output / "notes.txt").read_text() == "mine"  # not the benchmark's: left alone


def test_errors_are_reported_plainly(tmp_path, data_dir, capsys):
    assert main(["bench", "--model", str(tmp_path / "nope"), "--data", str(data_dir), "-o", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "--model", "bicubic", "--data", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    assert main(["bench", "--model", "bicubic", "--data", str(data_dir), "--classic", "gif", "-o", str(tmp_path)]) == 2
    assert "gif" in capsys.readouterr().err
    args = ["bench", "--model", "bicubic", "--data", str(data_dir), "-o", str(tmp_path / "g"), "--grid-images", "-1"]
    assert main(args) == 2 and "--grid-images must be 0" in capsys.readouterr().err  # had said grids/ was written


def test_a_killed_or_failed_run_leaves_the_earlier_benchmark_and_nothing_of_its_own(tmp_path, model_dir, data_dir):
    output = tmp_path / "out"
    common = ["--data", str(data_dir), "--limit", "1", "--classic", "none", "--no-fid", "--no-lpips", "-o", str(output)]
    assert main(["bench", "--model", "bicubic", *common]) == 0
    before = (output / "summary.json").read_text()
    # What a run killed midway leaves: its marker, the earlier benchmark set aside, its own partial references.
    (output / ".previous-benchmark").mkdir()
    for name in ("reference", "reconstructions", "grids", "plots", "summary.json", "summary.md", "per_image.csv"):
        (output / name).rename(output / ".previous-benchmark" / name)
    (output / ".benchmark-running").write_text("")
    (output / "reference").mkdir()
    (output / "reference" / "partial.png").write_bytes(b"")
    assert main(["bench", "--model", str(tmp_path / "typo"), *common]) == 2  # refused: nothing new to show
    assert (output / "summary.json").read_text() == before and not (output / ".previous-benchmark").exists()
    assert not (output / "reference" / "partial.png").exists() and not (output / ".benchmark-running").exists()
    # Killed in its first run into a folder: its partial outputs are removed by the next run, not refused.
    (output / ".benchmark-running").write_text("")
    (output / "summary.json").unlink()
    assert main(["bench", "--model", "bicubic", *common]) == 0

    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(bad / "a.png")  # written before the failure
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    fresh = tmp_path / "fresh"
    assert main(["bench", "--model", "bicubic", "--data", str(bad), *common[4:-1], str(fresh)]) == 2
    assert not fresh.exists()  # a failed first run leaves no partial benchmark, nor the folder it made
    fresh.mkdir()  # a folder the user made stays, empty
    assert main(["bench", "--model", "bicubic", "--data", str(bad), *common[4:-1], str(fresh)]) == 2
    assert fresh.is_dir() and not any(fresh.iterdir())


def test_an_interrupted_run_and_an_output_that_is_a_file_are_said_plainly(tmp_path, data_dir, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    assert main(["bench", "--model", "bicubic", "--data", str(data_dir), "-o", str(tmp_path / "file")]) == 2
    assert "file: is a file; -o takes the folder" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("codec.bench.bench", interrupted)
    assert main(["bench", "--model", "bicubic", "--data", str(data_dir), "-o", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip() == "codec bench: interrupted"


def test_a_classic_codec_that_cannot_reach_the_rate_is_flagged(tmp_path):
    data = tmp_path / "small"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(data / "a.png")
    args = ["bench", "--model", "preset:tiny", "--data", str(data), "--protocol", "full", "--classic", "jpeg"]
    assert main([*args, "--no-fid", "--no-lpips", "-o", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (jpeg,) = [row for row in summary["rows"] if row["kind"] == "classic"]
    assert jpeg["rate_met_fraction"] == 0 and jpeg["bpp"] > 1.0  # a JPEG's headers alone exceed 1 bpp at 24x24
    assert f"{jpeg['name']} fit its target rate for 0 of 1 images" in (tmp_path / "out" / "summary.md").read_text()


def test_a_folder_that_holds_files_named_as_a_benchmarks_outputs_is_refused(tmp_path, data_dir, capsys):
    # An image-quality dataset with its own reference/ folder: a benchmark writing there would mix with it, and a
    # rerun would set it aside and delete it.
    project = tmp_path / "project"
    (project / "reference").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(project / "reference" / "mine.png")
    args = ["bench", "--model", "bicubic", "--classic", "none", "--no-fid", "--no-lpips", "--limit", "1"]
    assert main([*args, "--data", str(data_dir), "-o", str(project)]) == 2
    assert "already holds reference, not from a benchmark" in capsys.readouterr().err
    assert main([*args, "--data", str(project / "reference"), "-o", str(project)]) == 2
    assert sorted(p.name for p in (project / "reference").iterdir()) == ["mine.png"]  # untouched
    assert sorted(p.name for p in project.iterdir()) == ["reference"]
