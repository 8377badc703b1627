"""The two helpers that move training data to a lent GPU and weights back: scripts/pack_images.py (lossless WebP,
checked pixel for pixel) and scripts/safetensors_parts.py (split under a size limit, joined back exactly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from script_loading import load_script


def _photo_folder(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        # Smooth gradients plus noise: compressible like a photo, yet every pixel matters to the check.
        ramp = np.linspace(0, 200, 48, dtype=np.float32)
        pixels = ramp[None, :, None] + ramp[:, None, None] / 2 + rng.integers(0, 40, (48, 48, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"crop-{index}.png")
    (folder / "manifest.json").write_text('{"sources": []}')
    return folder


def test_packed_images_hold_the_same_pixels_and_the_other_files(tmp_path, capsys):
    pack = load_script("pack_images")
    train = _photo_folder(tmp_path / "data" / "train")
    assert pack.main([str(train), "--out", str(tmp_path / "packed")]) == 0
    packed = tmp_path / "packed" / "train"
    assert sorted(p.name for p in packed.iterdir()) == ["crop-0.webp", "crop-1.webp", "crop-2.webp", "manifest.json"]
    for index in range(3):
        original = np.asarray(Image.open(train / f"crop-{index}.png").convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(packed / f"crop-{index}.webp").convert("RGB")), original)
    assert (packed / "manifest.json").read_text() == '{"sources": []}'
    assert "total" in capsys.readouterr().out


def test_a_rerun_keeps_what_is_packed_and_a_bad_image_is_named(tmp_path):
    pack = load_script("pack_images")
    train = _photo_folder(tmp_path / "train", count=1)
    pack.main([str(train), "--out", str(tmp_path / "packed")])
    first = (tmp_path / "packed" / "train" / "crop-0.webp").stat().st_mtime_ns
    (train / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"broken\.png: cannot read the image"):
        pack.main([str(train), "--out", str(tmp_path / "packed")])
    assert (tmp_path / "packed" / "train" / "crop-0.webp").stat().st_mtime_ns == first
    assert not list((tmp_path / "packed" / "train").glob("broken*"))


def test_parts_stay_under_the_limit_and_join_to_the_same_tensors(tmp_path):
    parts = load_script("safetensors_parts")
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(100, 50, generator=generator).half() for i in range(7)}
    tensors["scale"] = torch.tensor([0.5])
    source = tmp_path / "model.safetensors"
    save_file(tensors, str(source), metadata={"format": "pt"})
    limit_mb = 0.025  # 25,000 bytes: two 10,000-byte tensors per part
    assert parts.main(["split", str(source), str(tmp_path / "parts"), "--max-mb", str(limit_mb)]) == 0
    pieces = sorted((tmp_path / "parts").glob("model.part-*.safetensors"))
    assert len(pieces) == 4
    for piece in pieces:
        assert sum(t.numel() * t.element_size() for t in load_file(str(piece)).values()) <= 25_000
    joined = tmp_path / "joined.safetensors"
    assert parts.main(["join", *map(str, reversed(pieces)), "-o", str(joined)]) == 0
    back = load_file(str(joined))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[key], tensors[key]) for key in tensors)


def test_a_tensor_over_the_limit_is_refused_by_name(tmp_path):
    parts = load_script("safetensors_parts")
    source = tmp_path / "big.safetensors"
    save_file({"huge": torch.zeros(10_000)}, str(source))
    with pytest.raises(SystemExit, match="tensor huge alone is 40000 bytes"):
        parts.main(["split", str(source), str(tmp_path / "parts"), "--max-mb", "0.01"])
