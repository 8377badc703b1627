"""`codec cache` notices every change that would make a cached row wrong, and refuses what it cannot carry:
captions edited beside their images, files a dataset's rows point at, the Python API's and the CLI's number
types, carried columns that would shadow the reader's own, and columns a folder does not have."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cache_testing import build, cli, image_folder, read_rows, smooth_image, tiny_model_dir
from PIL import Image

from codec.cache.verify import verify_cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("staleness_model"))


def _touch(path: Path, step: int) -> None:
    os.utime(path, ns=(step, step))  # a distinct mtime even on a coarse clock


def test_an_edited_caption_makes_its_shard_stale(tmp_path, model_dir):
    folder = image_folder(tmp_path / "images", [(32, 32)] * 4)
    (folder / "img001.txt").write_text("a red cat")
    out = tmp_path / "out"
    build(folder, out, model_dir)
    (folder / "img001.txt").write_text("a blue bird on a branch")
    _touch(folder / "img001.txt", 1)
    summary = build(folder, out, model_dir)
    assert (summary.reused, summary.written) == (1, 1)  # shards [0-2] and [3]
    captions = {row["key"]: row["caption"] for row in read_rows(out)}
    assert captions["img001.png"] == "a blue bird on a branch" and captions["img000.png"] is None
    (folder / "img003.txt").write_text("new")  # a caption added where there was none
    assert build(folder, out, model_dir).written == 1


def test_an_unreadable_caption_is_named_as_the_reason_its_image_is_skipped(tmp_path, model_dir):
    folder = image_folder(tmp_path / "images", [(32, 32)] * 2)
    (folder / "img000.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = tmp_path / "out"
    summary = build(folder, out, model_dir)
    assert (summary.rows, summary.skipped) == (1, 1)
    entry = json.loads((out / "skipped.jsonl").read_text())
    assert entry["key"] == "img000.png" and f"its caption {folder / 'img000.txt'} cannot be read" in entry["reason"]


def test_files_a_datasets_rows_point_at_are_checked_like_a_folders(tmp_path, model_dir):
    datasets = pytest.importorskip("datasets")
    from codec.cache.sources import DatasetSource

    folder = image_folder(tmp_path / "images", [(32, 32)] * 4)
    paths = [str(folder / f"img{i:03d}.png") for i in range(4)]
    saved = tmp_path / "strings"
    datasets.Dataset.from_dict({"image": paths}).save_to_disk(str(saved))
    # An Image column that references files (save_to_disk would embed their bytes; loaders such as imagefolder's
    # keep the paths): an in-memory dataset, whose own fingerprint knows nothing of the files.
    referencing = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": p} for p in paths]})
    referencing = referencing.cast_column("image", datasets.Image())
    sources = {
        "strings": lambda: saved,
        "image-paths": lambda: DatasetSource(referencing, "mem", "train", "image", None),
    }
    for step, (name, source) in enumerate(sources.items(), start=2):
        out = tmp_path / f"out-{name}"
        build(source(), out, model_dir)
        before = read_rows(out)
        assert build(source(), out, model_dir).written == 0  # unchanged: reused
        Image.fromarray(smooth_image(90 + step, 32, 32)).save(paths[3])
        _touch(Path(paths[3]), step)
        summary = build(source(), out, model_dir)
        assert (summary.reused, summary.written) == (1, 1), name
        after = read_rows(out)
        assert after[:3] == before[:3] and after[3]["mean"] != before[3]["mean"]


def test_the_api_and_the_cli_number_types_make_one_cache(tmp_path, model_dir):
    folder = image_folder(tmp_path / "images", [(32, 32), (32, 64), (64, 32), (40, 40)])
    out = tmp_path / "out"
    build(folder, out, model_dir, buckets=True, bucket_step=16, max_aspect=2)  # an int, from Python
    args = ["cache", folder, "-o", out, "--model", model_dir, "--resolution", 32, "--buckets", "--bucket-step", 16]
    code, stdout, stderr = cli([*args, "--max-aspect", 2, "--shard-size", 3, "--num-workers", 0, "--device", "cpu"])
    assert code == 0, stderr
    assert "(2 already done, 0 written now)" in stdout  # the same settings: nothing to encode again
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert verify_cache(out).ok


def test_a_carried_column_may_not_take_a_name_the_reader_gives_its_items(tmp_path, model_dir):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(smooth_image(i, 32, 32)) for i in range(2)]
    table = datasets.Dataset.from_dict({"image": images, "latents": [[0.0], [1.0]], "flipped": [True, False]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"column\(s\) \['latents', 'flipped'\] would clash"):
        build(tmp_path / "saved", tmp_path / "out", model_dir)


def test_a_folder_carries_only_its_captions_and_says_so(tmp_path, model_dir):
    folder = image_folder(tmp_path / "images", [(32, 32)] * 2)
    (folder / "img000.txt").write_text("zero")
    base = ["cache", folder, "--model", model_dir, "--resolution", 32, "--num-workers", 0, "--device", "cpu"]
    code, _, stderr = cli([*base, "-o", tmp_path / "a", "--columns", "caption,nope"])
    assert code == 2 and "cannot carry column(s) ['nope']" in stderr and "'caption'" in stderr
    code, _, stderr = cli([*base, "-o", tmp_path / "b", "--columns", "caption"])
    assert code == 0, stderr
    assert [row["caption"] for row in read_rows(tmp_path / "b")] == ["zero", None]
    plain = image_folder(tmp_path / "plain", [(32, 32)])
    code, _, stderr = cli([*base[:1], plain, *base[2:], "-o", tmp_path / "c", "--columns", "caption"])
    assert code == 2 and "the columns it has: none" in stderr
    assert np.isfinite(np.asarray(read_rows(tmp_path / "b")[0]["mean"], dtype=np.float32)).all()


def test_a_stray_caption_in_an_uncaptioned_folder_is_left_out_with_columns_none(tmp_path, model_dir):
    folder = image_folder(tmp_path / "images", [(32, 32)] * 3)
    base = ["cache", folder, "--model", model_dir, "--resolution", 32, "--num-workers", 0, "--device", "cpu"]
    assert cli([*base, "-o", tmp_path / "out"])[0] == 0
    (folder / "img001.txt").write_text("a note that is not a caption")
    code, _, stderr = cli([*base, "-o", tmp_path / "out"])  # a caption column would change what the cache holds
    assert code == 2 and "carried_columns" in stderr
    code, stdout, stderr = cli([*base, "-o", tmp_path / "out", "--columns", "none"])
    assert code == 0, stderr
    assert "(1 already done, 0 written now)" in stdout and "caption" not in read_rows(tmp_path / "out")[0]


def test_a_list_whose_every_path_fails_says_the_cache_is_empty(tmp_path, model_dir):
    folder = image_folder(tmp_path / "images", [(32, 32)] * 2)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("images/img000.png\nimages/img001.png\n")  # relative to the list's folder: both wrong
    base = ["cache", listing, "--model", model_dir, "--resolution", 32, "--num-workers", 0, "--device", "cpu"]
    code, stdout, _ = cli([*base, "-o", tmp_path / "out"])
    assert code == 0 and "warning: every image was skipped, so the cache is empty" in stdout
    assert folder.is_dir()


def test_a_file_whose_name_is_not_utf8_is_left_out_with_a_warning(tmp_path, model_dir, caplog):
    folder = image_folder(tmp_path / "images", [(32, 32), (32, 32)])
    bad = folder / os.fsdecode(b"bad\xff.png")  # a name Linux allows and Parquet's UTF-8 strings do not
    bad.write_bytes((folder / "img000.png").read_bytes())
    summary = build(folder, tmp_path / "out", model_dir)  # had ended the whole run at the first shard
    assert summary.rows == 2 and [row["key"] for row in read_rows(tmp_path / "out")] == ["img000.png", "img001.png"]
    assert "bad\\xff.png" in caplog.text and "not UTF-8" in caplog.text
