"""Benchmark sources and protocols."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from codec.bench.data import DataSourceError, apply_protocol, open_source
from codec.images import ImageError


def _write(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def test_folder_is_recursive_sorted_and_names_are_unique(tmp_path):
    _write(tmp_path / "b.png", 20, 10)
    _write(tmp_path / "a.png", 20, 10)
    _write(tmp_path / "a.jpg", 20, 10)
    _write(tmp_path / "sub" / "c d.png", 20, 10)
    items = open_source(tmp_path)
    assert [item.name for item in items] == ["a", "a_2", "b", "sub__c_d"]
    assert items[1].source.endswith("a.png")


def test_file_list_and_single_image(tmp_path):
    array = _write(tmp_path / "img" / "x.png", 30, 20)
    (tmp_path / "list.txt").write_text("# comment\nimg/x.png\n\n")
    items = open_source(tmp_path / "list.txt")
    assert [item.name for item in items] == ["x"]
    assert np.array_equal(items[0].load("full"), array)
    assert [item.name for item in open_source(tmp_path / "img" / "x.png")] == ["x"]


def test_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    arrays = [np.full((12, 16, 3), value, dtype=np.uint8) for value in (10, 200)]
    dataset = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays]}).cast_column(
        "image", datasets.Image()
    )
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved"))
    items = open_source(tmp_path / "saved")
    assert [item.name for item in items] == ["0", "1"]
    assert np.array_equal(items[1].load("full"), arrays[1])
    with pytest.raises(DataSourceError, match="no split 'test'"):
        open_source(tmp_path / "saved", split="test")


def test_crop256_resizes_the_short_side_and_takes_the_center():
    y, x = np.mgrid[0:300, 0:600]
    image = Image.fromarray(np.stack([x % 256, y % 256, (x // 3) % 256], axis=2).astype(np.uint8))
    out = apply_protocol(image, "crop256")
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    expected = np.asarray(image.resize((512, 256), Image.Resampling.BICUBIC))[:, 128:384]
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 2  # same as resizing whole, then cropping
    small = apply_protocol(Image.new("RGB", (100, 50)), "crop256")  # upscaled to fit
    assert small.shape == (256, 256, 3)


def test_full_keeps_the_native_size():
    image = Image.new("RGB", (37, 45), (1, 2, 3))
    assert apply_protocol(image, "full").shape == (45, 37, 3)
    with pytest.raises(ValueError, match="crop256, full"):
        apply_protocol(image, "crop512")


def test_errors_name_the_source(tmp_path):
    with pytest.raises(DataSourceError, match="no such file or folder"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no image files"):
        open_source(tmp_path / "empty")
    bad = tmp_path / "bad" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match=r"broken\.png"):
        open_source(bad.parent)[0].load("full")
