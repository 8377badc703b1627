"""A folder cache is sharded in content-defined blocks of its keys: added or removed images re-encode only their
own block, every other shard file stays byte for byte; a cache of positional shards is encoded again once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cache_testing import (
    build,
    folder_keys,
    image_folder,
    planned,
    read_rows,
    shard_files,
    shard_keys,
    smooth_image,
    tiny_model_dir,
)
from PIL import Image

from codec.cache.key_blocks import CAP, block_file, plan_blocks
from codec.cache.verify import verify_cache

SIZE = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("blocks_model"))


def _snapshot(out: Path) -> dict[tuple[str, ...], tuple[Path, bytes, int]]:
    """Each shard by the keys it holds: its file, bytes and mtime."""
    return {tuple(shard_keys(p)): (p, p.read_bytes(), p.stat().st_mtime_ns) for p in shard_files(out)}


def _untouched(before: dict, out: Path) -> list[tuple[str, ...]]:
    """The blocks of `before` still in the cache in the same file, byte-identical, not rewritten."""
    kept = []
    for keys, (path, data, stamp) in before.items():
        if path.exists() and tuple(shard_keys(path)) == keys:
            assert path.read_bytes() == data and path.stat().st_mtime_ns == stamp, path
            kept.append(keys)
    return kept


def test_blocks_depend_on_the_keys_not_their_positions():
    keys = [f"k{i:04d}" for i in range(2000)]
    blocks = plan_blocks(keys, 10)
    assert [i for block in blocks for i in block] == list(range(2000))  # every key once, in order
    assert max(len(block) for block in blocks) <= CAP * 10 and 5 < 2000 / len(blocks) < 15
    inserted = sorted([*keys, "k0500x"])
    after = {tuple(inserted[b.start : b.stop]) for b in plan_blocks(inserted, 10)}
    before = {tuple(keys[b.start : b.stop]) for b in blocks}
    assert len(before - after) <= 2  # the block it fell in (and a capped neighbour at worst)
    assert block_file("a") != block_file("b") and block_file("a") == block_file("a")


def test_added_and_removed_images_reencode_only_their_blocks(tmp_path, model_dir):
    folder = image_folder(tmp_path / "images", [(32, 32)] * 30)
    out = tmp_path / "out"
    first = build(folder, out, model_dir, shard_size=SIZE)
    assert first.written == len(planned(folder_keys(folder), SIZE)) > 4
    before = _snapshot(out)

    added = ["aaa.png", "img014b.png"]  # sorting first, and in the middle
    for seed, name in enumerate(added):
        Image.fromarray(smooth_image(50 + seed, 32, 32)).save(folder / name)
    summary = build(folder, out, model_dir, shard_size=SIZE)
    blocks = planned(folder_keys(folder), SIZE)
    with_new = [block for block in blocks if set(block) & set(added)]
    assert summary.written == len(with_new) and summary.reused == len(blocks) - len(with_new)
    kept = _untouched(before, out)
    assert len(kept) == len(blocks) - len(with_new)  # every block but the new images' kept its file
    assert sorted((out / "data").glob("*.parquet")) == sorted(shard_files(out))  # the replaced blocks' files gone
    fresh = tmp_path / "fresh"
    build(folder, fresh, model_dir, shard_size=SIZE)
    assert read_rows(out) == read_rows(fresh)
    assert [p.name for p in shard_files(out)] == [p.name for p in shard_files(fresh)]
    assert verify_cache(out).ok

    before = _snapshot(out)
    gone = "img020.png"
    (folder / gone).unlink()
    summary = build(folder, out, model_dir, shard_size=SIZE)
    blocks = planned(folder_keys(folder), SIZE)
    assert summary.written <= 1 and len(_untouched(before, out)) == len(blocks) - summary.written
    assert gone not in [row["key"] for row in read_rows(out)] and verify_cache(out).ok


def test_a_cache_of_positional_shards_is_encoded_again_once(tmp_path, model_dir, caplog):
    folder = image_folder(tmp_path / "images", [(32, 32)] * 7)
    out = tmp_path / "out"
    build(folder, out, model_dir)
    expected = read_rows(out)
    # As an earlier version named them: shard-00000.parquet, ... in key order, and no layout in the manifest.
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["storage"]["layout"]
    for index, (path, entry) in enumerate(zip(shard_files(out), manifest["shards"], strict=True)):
        entry["file"] = f"data/shard-{index:05d}.parquet"
        path.rename(out / entry["file"])
    (out / "manifest.json").write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger="codec.cache.writer"):
        summary = build(folder, out, model_dir)
    assert "encoding it once again in blocks of keys" in caplog.text
    assert summary.written == summary.shards == len(planned(folder_keys(folder)))
    assert not list((out / "data").glob("shard-0000?.parquet")) and read_rows(out) == expected  # none mixed in
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="codec.cache.writer"):
        assert build(folder, out, model_dir).written == 0
    assert "once again" not in caplog.text and verify_cache(out).ok
