"""scripts/prepare_training_data.py on the photos bundled with scikit-image and scikit-learn only (--skip-debian: no
apt, no network), at a small crop size so the whole run stays within a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from script_loading import load_script

pytest.importorskip("skimage")
pytest.importorskip("sklearn")


def test_crops_manifest_split_and_rerun(tmp_path: Path) -> None:
    script = load_script("prepare_training_data")
    args = ["--out", str(tmp_path / "train"), "--skip-debian", "--crop", "64", "--crops-per-image", "2"]
    args += ["--scales", "1,0.25", "--generated", "2", "--validation-fraction", "0.2", "--cache", str(tmp_path / "c")]
    assert script.main(args) == 0
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    sources = manifest["sources"]
    assert {s["origin"] for s in sources} == {"skimage", "sklearn", "generated"}
    assert manifest["packages"] == {} and not (tmp_path / "c").exists()  # nothing fetched

    # Every crop listed exists in its split's folder, is RGB and crop-sized, and no other PNG is there.
    listed = {"train": set(), "val": set()}
    for s in sources:
        assert s["licence"] and s["version"] and s["crops"], s["id"]
        listed[s["split"]].update(s["crops"])
    assert listed["val"], "a validation fraction of 0.2 holds out at least one source"
    for split, names in listed.items():
        assert {p.name for p in (tmp_path / split).glob("*.png")} == names
    with Image.open(tmp_path / "val" / sorted(listed["val"])[0]) as crop:
        assert crop.size == (64, 64) and crop.mode == "RGB"

    # Validation never shares a source, or a variant group, with training; the stereo pair stays together.
    groups = {split: {s["group"] for s in sources if s["split"] == split} for split in ("train", "val")}
    assert not groups["train"] & groups["val"]
    by_id = {s["id"]: s for s in sources}
    # codec demo's sample photos and the photos without a stated licence never become training data.
    for excluded in ("astronaut", "coffee", "chelsea", "motorcycle_left", "moon"):
        assert f"skimage-{excluded}" not in by_id

    # Skips say why: too small, flat graphics, the hand-excluded colour wheel, the demo photos.
    reasons = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert "demo sample photo" in reasons["skimage/data/astronaut.png"]
    assert "flat graphic" in reasons["skimage/data/horse.png"]
    assert "colour wheel" in reasons["skimage/data/color.png"]

    # Rerunning with the same arguments writes nothing new and reproduces the manifest byte for byte.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    first = (tmp_path / "train" / "manifest.json").read_bytes()
    removed = tmp_path / "train" / sorted(listed["train"])[0]
    pixels = removed.read_bytes()
    removed.unlink()  # ...and a lost crop comes back with the same pixels
    assert script.main(args) == 0
    assert (tmp_path / "train" / "manifest.json").read_bytes() == first
    assert removed.read_bytes() == pixels
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png") if p != removed} == {
        p: t for p, t in before.items() if p != removed
    }

    # Other crop options over the same folder are refused, since existing crops would be kept as they are.
    with pytest.raises(SystemExit) as refused:
        script.main([*args, "--crop", "32"])
    assert refused.value.code == 2
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png") if p != removed} == {
        p: t for p, t in before.items() if p != removed
    }


def test_a_crop_left_in_the_other_split_is_reported(tmp_path: Path, capsys) -> None:
    script = load_script("prepare_training_data")
    args = ["--out", str(tmp_path / "train"), "--skip-debian", "--crop", "64", "--crops-per-image", "1"]
    args += ["--scales", "1", "--generated", "0", "--validation-fraction", "0.2", "--cache", str(tmp_path / "c")]
    assert script.main(args) == 0
    val_crop = sorted((tmp_path / "val").glob("*.png"))[0]
    (tmp_path / "train" / val_crop.name).write_bytes(val_crop.read_bytes())  # as an earlier split would leave it
    capsys.readouterr()
    assert script.main(args) == 0
    assert f"note: 1 PNGs in the output folders were not made with these arguments, e.g. {tmp_path / 'train'}" in (
        capsys.readouterr().out
    )
