"""Training data: sources (folder, file list, parquet, saved dataset, hub), crops, determinism, bad-file skipping."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    DatasetColumn,
    DataSourceError,
    ImageDataset,
    collate_skip_bad,
    open_image_source,
    split_train_validation,
)

PHOTOS = Path(__file__).resolve().parent.parent / "data" / "photos"
PHOTO_NAMES = ["astronaut.jpg", "camera.png", "chelsea.png", "coffee.jpg", "retina.jpg", "rocket.jpg"]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets`, with its cache (where load_dataset("parquet") writes arrow files) under tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def _photo_dataset(datasets, names=PHOTO_NAMES[:3]):
    pil = [Image.open(PHOTOS / name).convert("RGB") for name in names]
    table = datasets.Dataset.from_dict({"image": pil, "caption": [f"photo {name}" for name in names]})
    return table.cast_column("image", datasets.Image())


def _gradient_png(path: Path, size: int = 32) -> Path:
    """A square, left-to-right gradient: any mirroring shows, and at size == resolution nothing is resampled."""
    row = np.linspace(0, 255, size).astype(np.uint8)
    Image.fromarray(np.stack([np.tile(row, (size, 1))] * 3, axis=2)).save(path)
    return path


def _bad_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in PHOTO_NAMES[:3]:
        shutil.copy(PHOTOS / name, folder / name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes((PHOTOS / "coffee.jpg").read_bytes()[:200] + b"not a jpeg" * 20)
    return folder


def test_folder_source_is_recursive_sorted_and_images_only(tmp_path):
    assert [p.name for p in open_image_source(PHOTOS)] == PHOTO_NAMES  # README.md is not an image
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    shutil.copy(PHOTOS / "rocket.jpg", tmp_path / "b" / "deeper" / "z.jpg")
    shutil.copy(PHOTOS / "coffee.jpg", tmp_path / "b" / "a.JPG")
    shutil.copy(PHOTOS / "camera.png", tmp_path / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert open_image_source(str(tmp_path)) == [tmp_path / "b/a.JPG", tmp_path / "b/deeper/z.jpg", tmp_path / "c.png"]


def test_file_list_source_is_relative_to_the_list_and_skips_comments(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    absolute = PHOTOS / "rocket.jpg"
    text = f"# training images\n\n../photos/a.jpg\n  sub/b.png  \n   # indented comment\n{absolute}\n"
    (lists / "train.txt").write_text(text)
    assert open_image_source(lists / "train.txt") == [tmp_path / "photos/a.jpg", lists / "sub/b.png", absolute]
    (lists / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataSourceError, match="names no images"):
        open_image_source(lists / "empty.txt")


def test_parquet_file_and_folder_sources(tmp_path, datasets_cache):
    table = _photo_dataset(datasets_cache)
    table.to_parquet(str(tmp_path / "photos.parquet"))
    source = open_image_source(tmp_path / "photos.parquet")
    assert isinstance(source, DatasetColumn) and len(source) == 3
    assert source.dataset.column_names == ["image"]  # the caption is not carried along
    pixels = ImageDataset(source, 48)[1]
    assert pixels.shape == (3, 48, 48)

    folder = tmp_path / "parquet_folder"
    folder.mkdir()
    table.to_parquet(str(folder / "train-00000.parquet"))
    _photo_dataset(datasets_cache, PHOTO_NAMES[3:5]).to_parquet(str(folder / "validation-00000.parquet"))
    assert len(open_image_source(folder)) == 3
    assert len(open_image_source(folder, split="validation")) == 2
    with pytest.raises(DataSourceError, match=r"no split 'test'.*'train', 'validation'"):
        open_image_source(folder, split="test")


def test_saved_to_disk_dataset_and_dataset_dict(tmp_path, datasets_cache):
    table = _photo_dataset(datasets_cache)
    table.save_to_disk(str(tmp_path / "saved"))
    source = open_image_source(tmp_path / "saved")
    assert len(source) == 3
    assert torch.equal(
        ImageDataset(source, 40, train=False)[2], ImageDataset([PHOTOS / PHOTO_NAMES[2]], 40, train=False)[0]
    )

    datasets_cache.DatasetDict({"train": table, "validation": table.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(open_image_source(tmp_path / "dict", split="validation")) == 1
    with pytest.raises(DataSourceError, match=r"no split 'test'"):
        open_image_source(tmp_path / "dict", split="test")

    # A trainer given the same dataset for both reads its train split, and validates on the held-out one.
    from training.config import ConfigError, load_config
    from training.data import build_data

    dataset = tmp_path / "dict"
    train, val = build_data(load_config("tiny", [f"data.train={dataset}", f"data.validation={dataset}"]))
    assert (len(train), len(val)) == (3, 1)
    with pytest.raises(DataSourceError, match=r"no split 'held-out'"):
        build_data(
            load_config(
                "tiny", [f"data.train={dataset}", f"data.validation={dataset}", "data.validation_split=held-out"]
            )
        )
    # A separate validation dataset with one split reads it as data.split, as before the held-out default.
    table.save_to_disk(str(tmp_path / "only-train"))
    separate = [f"data.train={dataset}", f"data.validation={tmp_path / 'only-train'}"]
    assert len(build_data(load_config("tiny", separate))[1]) == 3
    with pytest.raises(ConfigError, match=r"validation_split: the split of data\.validation, which is not set"):
        load_config("tiny", [f"data.train={dataset}", "data.validation_split=validation"])


def test_missing_image_column_names_the_column_and_the_available_ones(tmp_path, datasets_cache):
    _photo_dataset(datasets_cache).to_parquet(str(tmp_path / "photos.parquet"))
    with pytest.raises(DataSourceError, match=r"no column 'img'.*\['image', 'caption'\]"):
        open_image_source(tmp_path / "photos.parquet", image_column="img")
    # A string column is read as paths, bytes as encoded images; anything else is refused at once.
    datasets_cache.Dataset.from_dict({"label": [1, 2]}).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(DataSourceError, match=r"column 'label' holds .*not images"):
        open_image_source(tmp_path / "ints", image_column="label")


def test_hub_name_errors_clearly_when_offline_and_missing_paths_never_go_online(monkeypatch, datasets_cache):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/photos' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets_cache, "load_dataset", offline)
    with pytest.raises(DataSourceError, match=r"'someone/photos' \(split 'train'\).*ConnectionError.*offline"):
        open_image_source("someone/photos")
    for missing in ("./nowhere", "/no/such/folder", "data/train/images", "photos.parquet"):
        with pytest.raises(DataSourceError, match="no such file or folder"):
            open_image_source(missing)


def test_items_are_square_tensors_in_range_even_when_upscaled():
    source = open_image_source(PHOTOS)
    for resolution in (64, 160):  # 160 is above every photo's short side: upscaled
        dataset = ImageDataset(source, resolution)
        for pixels in (dataset[i] for i in range(len(dataset))):
            assert pixels.shape == (3, resolution, resolution) and pixels.dtype == torch.float32
            assert -1.0 <= pixels.min() < 0.0 < pixels.max() <= 1.0


def test_crops_depend_only_on_seed_epoch_and_index():
    source = open_image_source(PHOTOS)
    first, second = ImageDataset(source, 48, seed=3), ImageDataset(source, 48, seed=3)
    other_seed = ImageDataset(source, 48, seed=4)
    epoch0 = [first[i] for i in range(6)]
    assert all(torch.equal(a, second[i]) for i, a in enumerate(epoch0))  # e.g. a resumed run
    assert any(not torch.equal(a, other_seed[i]) for i, a in enumerate(epoch0))
    first.set_epoch(1)
    epoch1 = [first[i] for i in range(6)]
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True)) >= 3
    second.set_epoch(1)
    assert all(torch.equal(a, second[i]) for i, a in enumerate(epoch1))
    # The seed uses the index in the source, so a subset (e.g. the training split) crops each image the same way.
    subset = ImageDataset(source, 48, seed=3, indices=[4, 1])
    subset.set_epoch(1)
    assert len(subset) == 2 and torch.equal(subset[0], epoch1[4]) and torch.equal(subset[1], epoch1[1])


def test_eval_is_a_center_crop_without_flip():
    coffee = PHOTOS / "coffee.jpg"  # 160x107: resized to 72x48, the center 48x48 starts at x = 12
    dataset = ImageDataset([coffee], 48, train=False, flip=True)
    got = dataset[0]
    dataset.set_epoch(5)
    assert torch.equal(dataset[0], got)
    full = Image.open(coffee).convert("RGB").resize((72, 48), Image.Resampling.BICUBIC).crop((12, 0, 60, 48))
    expected = torch.from_numpy(np.asarray(full).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert (got - expected).abs().mean() < 0.02  # resampling only the crop: same up to edge filtering


def test_flip_only_when_enabled_and_training(tmp_path):
    path = _gradient_png(tmp_path / "gradient.png")
    original = ImageDataset([path], 32, train=False)[0]
    mirrored = original.flip(-1)
    assert original[0, 0, 0] < original[0, 0, -1]

    def outputs(dataset):
        for epoch in range(16):
            dataset.set_epoch(epoch)
            yield dataset[0]

    assert all(torch.equal(x, original) for x in outputs(ImageDataset([path], 32, flip=False)))
    flipped = [torch.equal(x, mirrored) for x in outputs(ImageDataset([path], 32, flip=True))]
    assert 0 < sum(flipped) < 16
    assert all(f or torch.equal(x, original) for f, x in zip(flipped, outputs(ImageDataset([path], 32)), strict=True))


def test_bad_files_are_skipped_counted_and_logged(tmp_path, caplog):
    source = open_image_source(_bad_folder(tmp_path))
    assert len(source) == 5
    dataset = ImageDataset(source, 32)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        batches = list(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_skip_bad))
    assert sum(len(b["pixels"]) for b in batches if b["pixels"] is not None) == 3
    assert sum(b["skipped"] for b in batches) == 2
    assert {(index, Path(name).name) for index, name, _ in dataset.bad_items} == {(3, "corrupt.jpg"), (4, "empty.png")}
    messages = [record.getMessage() for record in caplog.records]
    assert any("empty.png" in m and "empty" in m.split("empty.png", 1)[1] for m in messages)
    assert any("corrupt.jpg" in m and "corrupt" in m.split("corrupt.jpg", 1)[1] for m in messages)

    assert collate_skip_bad([None, None]) == {"pixels": None, "skipped": 2}


def test_bad_rows_of_a_dataset_are_skipped_with_their_row(tmp_path, datasets_cache, caplog):
    good = (PHOTOS / "rocket.jpg").read_bytes()
    table = datasets_cache.Dataset.from_dict(
        {"image": [{"bytes": good, "path": "rocket.jpg"}, {"bytes": b"junk", "path": "junk.jpg"}]}
    )
    table.cast_column("image", datasets_cache.Image()).save_to_disk(str(tmp_path / "rows"))
    dataset = ImageDataset(open_image_source(tmp_path / "rows"), 32)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        assert dataset[0].shape == (3, 32, 32) and dataset[1] is None
    assert "row 1 (junk.jpg)" in caplog.text


def test_workers_skip_bad_files_and_follow_set_epoch(tmp_path):
    dataset = ImageDataset(open_image_source(_bad_folder(tmp_path)), 32, seed=7)
    # Persistent workers hold their copy of the dataset across epochs: set_epoch must still reach them.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2, persistent_workers=True, collate_fn=collate_skip_bad
    )
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert sum(b["skipped"] for b in batches) == 2
        pixels = torch.cat([b["pixels"] for b in batches if b["pixels"] is not None])
        expected = torch.stack([x for x in (dataset[i] for i in range(len(dataset))) if x is not None])
        assert torch.equal(pixels, expected)


def test_split_train_validation_is_disjoint_covering_and_deterministic():
    train, val = split_train_validation(100, 0.1, seed=0)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert (train, val) == split_train_validation(100, 0.1, seed=0)
    assert val != split_train_validation(100, 0.1, seed=1)[1]
    assert split_train_validation(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(split_train_validation(5, 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one
    assert split_train_validation(1, 0.5, seed=0) == ([0], [])  # and always leaves one to train on
    assert split_train_validation(0, 0.5, seed=0) == ([], [])
    with pytest.raises(ValueError, match="fraction"):
        split_train_validation(10, 1.0, seed=0)
