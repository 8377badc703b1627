"""`codec cache` over input shards: tars and Parquet files made here, planned by shard, incremental, resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cache_testing import cli, tiny_model_dir
from shard_testing import build, file_bytes, parquet_bytes, rows, tar_bytes, write_tars

from codec.cache import LatentDataset
from codec.cache.shards import CacheError
from codec.cache.verify import verify_cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("shards_model"))


def _stats(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_tar_shards_cache_every_image_with_its_caption_and_new_shards_touch_nothing_else(tmp_path, model_dir):
    shards = tmp_path / "shards"
    write_tars(shards, range(8), uncaptioned=(4,), broken=(7,))
    out = tmp_path / "out"
    options = ["-o", out, "--model", model_dir, "--resolution", 32, "--shard-size", 2, "--num-workers", 1]
    code, stdout, stderr = cli(["cache", f"{shards}/{{00000..00007}}.tar", *options])
    assert code == 0, stderr
    assert "23 of 24 images cached in 16 shards (0 already done, 16 written now)" in stdout
    cached = {row["key"]: row for row in rows(out)}
    assert sorted(cached) == sorted(f"{i // 3:05d}.tar/{i:09d}" for i in range(24) if i != 7)
    assert cached["00001.tar/000000003"]["caption"] == "photo number 3"
    assert cached["00001.tar/000000004"]["caption"] is None
    assert json.loads(cached["00002.tar/000000006"]["json"]) == {"key": "000000006", "width": 40}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["key"], s["input"]) for s in skipped] == [("00002.tar/000000007", "00002.tar")]
    before, stamps = file_bytes(out / "data"), _stats(out / "data")
    report = (out / "skipped.jsonl").read_bytes()

    write_tars(shards, range(8, 10))
    code, stdout, stderr = cli(["cache", f"{shards}/{{00000..00009}}.tar", *options])
    assert code == 0, stderr
    assert "29 of 30 images cached in 20 shards (16 already done, 4 written now)" in stdout  # two new tars' parts
    after = file_bytes(out / "data")
    assert {name: after[name] for name in before} == before  # every existing part byte-identical...
    assert {name: (out / "data" / name).stat().st_mtime_ns for name in before} == stamps  # ...and not rewritten
    new = ["00008-00000.parquet", "00008-00001.parquet", "00009-00000.parquet", "00009-00001.parquet"]
    assert sorted(set(after) - set(before)) == new
    assert (out / "skipped.jsonl").read_bytes() == report
    report_of = verify_cache(out)
    assert report_of.ok and report_of.unchecked == 0 and report_of.shards == 20  # every part's checksum compared

    manifest = (out / "manifest.json").read_bytes()
    again = build(f"{shards}/{{00000..00009}}.tar", out, model_dir)
    assert (again.written, again.reused) == (0, 20)
    assert (out / "manifest.json").read_bytes() == manifest


def test_cache_requires_a_model_and_says_why(tmp_path):
    write_tars(tmp_path / "shards", range(1))
    code, _, stderr = cli(["cache", tmp_path / "shards", "-o", tmp_path / "out"])
    assert code == 2 and "--model is required" in stderr and "--model builtin" in stderr
    assert not (tmp_path / "out").exists()


def test_a_changed_shard_reencodes_its_parts_only_and_a_removed_one_drops_them(tmp_path, model_dir):
    shards = tmp_path / "shards"
    paths = write_tars(shards, range(3), per_shard=4)
    out = tmp_path / "out"
    build(shards, out, model_dir)  # a folder of shards
    before = file_bytes(out / "data")
    paths[1].write_bytes(tar_bytes(100, 1))  # shorter: one part instead of two
    os.utime(paths[1], ns=(1, 1))
    changed = build(shards, out, model_dir)
    assert (changed.reused, changed.written) == (4, 1)
    after = file_bytes(out / "data")
    assert "00001-00001.parquet" not in after  # the part it no longer has is gone
    assert all(after[name] == data for name, data in before.items() if not name.startswith("00001"))
    assert [r["key"] for r in rows(out) if r["key"].startswith("00001")] == ["00001.tar/000000100"]

    paths[0].unlink()
    removed = build(shards, out, model_dir)
    assert (removed.written, removed.rows) == (0, 5)
    assert sorted(file_bytes(out / "data")) == ["00001-00000.parquet", "00002-00000.parquet", "00002-00001.parquet"]
    assert verify_cache(out).ok
    (out / "data" / "00002-00000.parquet").write_bytes((out / "data" / "00001-00000.parquet").read_bytes())
    assert any("as another shard" in problem for problem in verify_cache(out).problems)


def test_a_glob_of_parquet_shards_caches_their_images_and_columns(tmp_path, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.parquet").write_bytes(parquet_bytes(0, 5, missing=(3,)))
    (data / "part-1.parquet").write_bytes(parquet_bytes(5, 3))
    (data / "other.parquet").write_bytes(b"not matched by the glob")
    out = tmp_path / "out"
    summary = build(f"{data}/part-*.parquet", out, model_dir)
    assert (summary.images, summary.rows, summary.skipped) == (8, 7, 1)
    cached = {row["key"]: row for row in rows(out)}
    assert sorted(cached) == [f"part-{i // 5}.parquet/k{i:05d}" for i in range(8) if i != 3]
    assert cached["part-1.parquet/k00006"]["caption"] == "row 6" and cached["part-1.parquet/k00006"]["score"] == 0.6
    skipped = json.loads((out / "skipped.jsonl").read_text())
    assert skipped["key"] == "part-0.parquet/k00003" and skipped["reason"] == "no image in this row"
    identity = json.loads((out / "manifest.json").read_text())["codec"]["identity"]
    dataset = LatentDataset(out, codec=identity)  # the trainer's reader takes it as any cache
    assert len(dataset) == 7 and dataset[0]["key"] == "part-0.parquet/k00000" and dataset[0]["caption"] == "row 0"


@pytest.mark.parametrize("kill_after", [0, 1, 2, 3, 4, 5])
def test_a_run_killed_after_any_part_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path, model_dir, kill_after):
    shards = tmp_path / "shards"
    write_tars(shards, range(2), per_shard=5, broken=(2,))  # parts of 2, 2, 1 items per shard
    whole = tmp_path / "whole"
    build(shards, whole, model_dir, flip=True, num_workers=0)

    class Killed(Exception):
        pass

    written = []

    def die(entry: dict) -> None:
        written.append(entry["file"])
        if len(written) > kill_after:
            raise Killed

    out = tmp_path / "out"
    with pytest.raises(Killed):
        build(shards, out, model_dir, flip=True, on_part_written=die)
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    (out / "data" / ".00001-00000.parquet.a1b2.tmp").write_bytes(b"half a part")  # what a kill mid-write leaves
    resumed = build(shards, out, model_dir, flip=True)
    assert resumed.reused == kill_after + 1 and resumed.reused + resumed.written == 6
    assert rows(out) == rows(whole)
    assert file_bytes(out / "data").keys() == file_bytes(whole / "data").keys()
    assert (out / "skipped.jsonl").read_bytes() == (whole / "skipped.jsonl").read_bytes()
    assert verify_cache(out).ok


def test_a_cache_of_other_settings_or_another_kind_is_refused(tmp_path, model_dir):
    shards = tmp_path / "shards"
    write_tars(shards, range(1))
    out = tmp_path / "out"
    build(shards, out, model_dir)
    with pytest.raises(CacheError, match="preprocessing resolution: cache has 32, this run has 64"):
        build(shards, out, model_dir, resolution=64)
    (tmp_path / "folder_cache").mkdir()
    (tmp_path / "folder_cache" / "manifest.json").write_text(
        json.dumps({"format": "latent-codec-cache", "storage": {}})
    )
    with pytest.raises(CacheError, match="a cache of another kind of source"):
        build(shards, tmp_path / "folder_cache", model_dir)


def test_an_unreadable_shard_stops_the_run_naming_it_and_keeps_what_was_written(tmp_path, model_dir):
    shards = tmp_path / "shards"
    write_tars(shards, range(2))
    (shards / "00001.tar").write_bytes(tar_bytes(3, 3)[:1500])  # cut inside a member
    out = tmp_path / "out"
    with pytest.raises(CacheError, match=r"00001\.tar: cannot be read"):
        build(shards, out, model_dir)
    assert (out / "data" / "00000-00000.parquet").is_file()


def test_a_streamed_dataset_is_cached_one_data_file_at_a_time(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data = tmp_path / "dataset" / "data"
    data.mkdir(parents=True)
    (data / "train-00000-of-00002.parquet").write_bytes(parquet_bytes(0, 3))
    (data / "train-00001-of-00002.parquet").write_bytes(parquet_bytes(3, 2, missing=(4,)))
    out = tmp_path / "out"
    summary = build(str(tmp_path / "dataset"), out, model_dir, streaming=True, columns=["caption"])
    assert (summary.images, summary.rows, summary.skipped, summary.written) == (5, 4, 1, 3)
    cached = rows(out)
    assert [r["key"] for r in cached] == [
        "train-00000-of-00002.parquet/000000000", "train-00000-of-00002.parquet/000000001",
        "train-00000-of-00002.parquet/000000002", "train-00001-of-00002.parquet/000000000",
    ]  # fmt: skip
    assert [r["caption"] for r in cached] == ["row 0", "row 1", "row 2", "row 3"] and "score" not in cached[0]
    assert build(str(tmp_path / "dataset"), out, model_dir, streaming=True, columns=["caption"]).written == 0
    (data / "train-00001-of-00002.parquet").write_bytes(parquet_bytes(3, 2))
    assert build(str(tmp_path / "dataset"), out, model_dir, streaming=True, columns=["caption"]).written == 1
