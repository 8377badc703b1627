"""`codec demo` writes every picture and a report whose figures match the written reconstructions."""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from codec.cli import main
from codec.cli.demo import SAMPLES
from codec.metrics import psnr


def test_demo_writes_pictures_and_a_truthful_report(tmp_path, ours, capsys):
    model = tmp_path / "model"
    ours.save_pretrained(model)
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(model), "-o", str(out)]) == 0
    for name in ("comparison.png", "interpolation.png", "prior_samples.png", "report.md"):
        assert (out / name).is_file(), name
    samples = sorted(SAMPLES.glob("*.png"))
    assert len(samples) >= 2
    report = (out / "report.md").read_text()
    for sample in samples:
        row = next(line for line in report.splitlines() if line.startswith(f"| {sample.name} "))
        reported = float(row.split("|")[5])
        original = np.array(Image.open(sample).convert("RGB"))
        reconstruction = np.array(Image.open(out / f"{sample.stem}_reconstruction.png"))
        assert reconstruction.shape == original.shape
        assert abs(psnr(original, reconstruction).item() - reported) < 0.01
    assert re.search(r"\(4, 32, 32\) \| 48x", report)
    strip = Image.open(out / "interpolation.png")
    assert strip.width > 7 * 256  # seven decoded steps side by side
    assert "comparison.png" in capsys.readouterr().out


def test_demo_takes_the_users_photos_whatever_their_names(tmp_path, ours):
    model = tmp_path / "model"
    ours.save_pretrained(model)
    photo = tmp_path / os.fsdecode(b"min\xe9.png")  # not UTF-8 (Latin-1): the report shows U+FFFD for the byte
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "demo"
    assert main(["demo", str(photo), "--model", str(model), "-o", str(out)]) == 0
    assert (out / os.fsdecode(b"min\xe9_reconstruction.png")).is_file()
    assert "| min\ufffd.png | 40x48 |" in (out / "report.md").read_text(encoding="utf-8")
