"""scripts/bench_fidelity.py on a small crop of a bundled photo with random weights: tiled output differs from
untiled by a finite PSNR, one tile covering the whole image gives the untiled output, and the report and the
difference pictures are written."""

from __future__ import annotations

import re

import pytest
import torch
from script_loading import SCRIPTS, load_script

import codec

PHOTO = SCRIPTS.parent / "codec" / "assets" / "samples" / "astronaut.png"


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    codec.AutoencoderKL(codec.preset("tiny")).save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_tiled_rows_and_precision_rows_are_reported(tmp_path, tiny_model, capsys):
    script = load_script("bench_fidelity")
    out = tmp_path / "out"
    args = ["--model", tiny_model, "--photos", str(PHOTO), "--size", "64", "96", "--tile", "4", "64", "--encode"]
    assert script.main([*args, "--precision-size", "32", "--device", "cpu", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert report in capsys.readouterr().out
    rows = re.findall(r"\| astronaut\.png \| 96x64 \| (\d+) \| ([\d.inf]+) \| ([\d.inf]+) \|", report)
    assert [tile for tile, _, _ in rows] == ["4", "64"]
    small_tile, whole = rows
    assert 0 < float(small_tile[1]) < 100  # tiles of 4 latent positions do change the output...
    assert float(whole[1]) == float("inf") or float(whole[1]) > 60  # ...a tile larger than the image does not
    assert re.search(r"\| astronaut\.png: bf16 decode against fp32 decode, 32x32 \| [\d.]+ \|", report)
    assert sorted(p.name for p in out.glob("*.png")) == [
        "bf16-minus-fp32-x8-astronaut.png",
        "tiled-4-minus-untiled-x8-astronaut.png",
        "tiled-64-minus-untiled-x8-astronaut.png",
    ]


def test_center_crop_covers_then_crops():
    script = load_script("bench_fidelity")
    image = torch.zeros(1, 3, 100, 200)
    assert script.center_crop(image, 50, 50).shape[-2:] == (50, 50)
    assert script.center_crop(image, 10, 300).shape[-2:] == (10, 300)
    assert script.center_crop(image, 0, 0).shape[-2:] == (100, 200)
