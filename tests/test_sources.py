"""codec.sources: what kind of source a string names, and one item decoded (the code cache, bench and training share)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from codec.images import ImageError
from codec.sources import (
    DatasetColumn,
    DatasetSplit,
    ImageFiles,
    SourceError,
    decode_image,
    image_column,
    item_path,
    open_source,
)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets`, with its cache (where load_dataset("parquet") writes arrow files) under tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def _png(path, value=0, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 0, 0)).save(path)
    return path


def _table(datasets, values=(10, 200)):
    images = [Image.new("RGB", (8, 6), (value, 0, 0)) for value in values]
    table = datasets.Dataset.from_dict({"image": images, "label": list(range(len(values)))})
    return table.cast_column("image", datasets.Image())


def test_folder_is_recursive_sorted_and_knows_its_captions(tmp_path):
    b, a = _png(tmp_path / "b.png"), _png(tmp_path / "sub" / "a.JPG")
    (tmp_path / "notes.md").write_text("not an image")
    opened = open_source(tmp_path, split="train")
    assert isinstance(opened, ImageFiles) and opened.kind == "folder" and opened.path == tmp_path
    assert opened.paths == [b, a] and not opened.captioned
    (tmp_path / "sub" / "a.txt").write_text("a caption")
    assert open_source(tmp_path, split="train").captioned


def test_list_keeps_its_order_and_its_lines(tmp_path):
    (tmp_path / "list.txt").write_text("# comment\nimg/z.png\n\n  ../a.png  \n")
    opened = open_source(str(tmp_path / "list.txt"), split="train")
    assert opened.kind == "list" and opened.paths == [tmp_path / "img/z.png", tmp_path.parent / "a.png"]
    assert opened.lines == [(2, "img/z.png"), (4, "../a.png")]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(SourceError, match="names no images"):
        open_source(tmp_path / "empty.txt", split="train")


def test_single_image_only_when_allowed(tmp_path):
    image = _png(tmp_path / "x.png")
    assert open_source(image, split="train", single_image=True) == ImageFiles("image", image, [image])
    with pytest.raises(SourceError, match=r"x\.png: expected a folder, a \.txt list"):
        open_source(image, split="train")


def test_parquet_file_and_folder(tmp_path, datasets_cache):
    _table(datasets_cache).to_parquet(str(tmp_path / "one.parquet"))
    opened = open_source(tmp_path / "one.parquet", split="validation")  # one file is one split, whatever is asked
    assert isinstance(opened, DatasetSplit) and opened.name == str(tmp_path / "one.parquet")
    assert len(opened.dataset) == 2 and opened.dataset.column_names == ["image", "label"]

    folder = tmp_path / "folder"
    folder.mkdir()
    _table(datasets_cache).to_parquet(str(folder / "train-00000.parquet"))
    _table(datasets_cache, (1, 2, 3)).to_parquet(str(folder / "validation-00000.parquet"))
    assert len(open_source(folder, split="validation").dataset) == 3
    with pytest.raises(SourceError, match=r"no split 'test'; it has \['train', 'validation'\]"):
        open_source(folder, split="test")


def test_saved_dataset_and_its_image_column(tmp_path, datasets_cache):
    datasets_cache.DatasetDict({"train": _table(datasets_cache)}).save_to_disk(str(tmp_path / "saved"))
    opened = open_source(tmp_path / "saved", split="train")
    assert isinstance(opened, DatasetSplit) and len(opened.dataset) == 2
    column = image_column(opened.dataset, "image", opened.name)
    assert isinstance(column, DatasetColumn) and column.dataset.column_names == ["image"]
    assert isinstance(column[1], dict)  # undecoded: a corrupt row fails in decode_image, not inside datasets
    assert decode_image(column[1]).getpixel((0, 0)) == (200, 0, 0)
    with pytest.raises(SourceError, match=r"no column 'img'; its columns are \['image', 'label'\]"):
        image_column(opened.dataset, "img", opened.name)
    with pytest.raises(SourceError, match=r"column 'label' holds .*not images"):
        image_column(opened.dataset, "label", opened.name)


def test_hub_names_go_to_datasets_and_missing_paths_never_do(monkeypatch, datasets_cache):
    asked = []

    def load_dataset(name, split):  # no network here: stands in for the hub
        asked.append((name, split))
        return _table(datasets_cache)

    monkeypatch.setattr(datasets_cache, "load_dataset", load_dataset)
    assert len(open_source("someone/photos", split="validation").dataset) == 2
    assert asked == [("someone/photos", "validation")]
    for missing in ("./nowhere", "/no/such/folder", "data/train/images", "photos.parquet", "x.png", "a b"):
        with pytest.raises(SourceError, match="no such file or folder"):
            open_source(missing, split="train")
    assert len(asked) == 1


def test_empty_folder(tmp_path):
    with pytest.raises(SourceError, match=r"no image files .* or parquet files in this folder"):
        open_source(tmp_path, split="train")


def test_decode_takes_paths_bytes_dicts_and_images_to_rgb(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 3), (255, 0, 0, 0)).save(path)
    data = path.read_bytes()
    for item in (path, str(path), data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}):
        image = decode_image(item)
        assert image.mode == "RGB" and image.size == (4, 3) and image.getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(Image.open(io.BytesIO(data))).mode == "RGB"
    assert np.asarray(decode_image(Image.new("L", (2, 2), 7))).tolist() == [[[7] * 3] * 2] * 2


def test_bad_items_name_the_file_and_the_reason_without_a_traceback(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match=r"corrupt\.png: not an image file") as caught:
        decode_image(corrupt, name=str(corrupt))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    truncated = tmp_path / "truncated.png"
    _png(tmp_path / "good.png", size=(64, 64))
    truncated.write_bytes((tmp_path / "good.png").read_bytes()[:60])
    with pytest.raises(ImageError, match=r"truncated\.png: cannot decode the image, perhaps truncated or corrupt"):
        decode_image(truncated, name=str(truncated))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"^the file is empty$"):  # without a name, the reason alone
        decode_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match=r"^no such file$"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match=r"^row 3: no image in this item \(a int\)$"):
        decode_image(3, name="row 3")


def test_max_pixels_refuses_from_the_header(tmp_path):
    path = _png(tmp_path / "big.png", size=(40, 30))
    assert decode_image(path, max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageError, match=r"too many pixels \(40x30 > 1199\)"):
        decode_image(path, max_pixels=1199)


def test_item_path_is_the_file_an_item_is_read_from(tmp_path):
    assert item_path(tmp_path / "a.png") == str(tmp_path / "a.png")
    assert item_path({"bytes": None, "path": "b.png"}) == "b.png"
    assert item_path({"bytes": b"...", "path": "b.png"}) is None  # read from its bytes
    assert item_path(b"...") is None
