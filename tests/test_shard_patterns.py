"""What a sharded source string names: brace ranges as WebDataset writes them, globs, folders, fsspec URLs."""

from __future__ import annotations

import pytest

from codec.cache.input_plan import part_file
from codec.cache.locations import fingerprint
from codec.cache.patterns import expand_braces, is_pattern, is_shard_source, list_inputs
from codec.sources import SourceError


def test_braces_expand_zero_padded_ranges_and_alternatives_in_order():
    assert expand_braces("d/{00008..00011}.tar") == ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x{}y") == ["x{}y"] and not is_pattern("x{}y") and is_pattern("a/{0..2}.tar")
    with pytest.raises(SourceError, match="more than"):
        expand_braces("{0..99999999999}")


def test_patterns_globs_folders_and_urls_list_shards_named_from_their_root(tmp_path):
    for name in ("00000.tar", "00001.tar", "00002.tar", "sub/00003.tar", "notes.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * 3)
    kind, root, inputs = list_inputs(f"{tmp_path}/{{00000..00001}}.tar")
    assert (kind, root, [i.name for i in inputs]) == ("tar", str(tmp_path), ["00000.tar", "00001.tar"])
    assert inputs[0].size == 3 and inputs[0].fingerprint.startswith("size=3;")
    assert [i.name for i in list_inputs(f"{tmp_path}/*.tar")[2]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [i.name for i in list_inputs(f"file://{tmp_path}")[2]] == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
        "sub/00003.tar",
    ]
    with pytest.raises(SourceError, match=r"1 of 4 shards it names do not exist \(first: .*00003.tar\)"):
        list_inputs(f"{tmp_path}/{{00000..00003}}.tar")
    (tmp_path / "a.parquet").write_bytes(b"")
    with pytest.raises(SourceError, match=r"both \.tar and \.parquet"):
        list_inputs(str(tmp_path))
    with pytest.raises(SourceError, match="no shard files"):
        list_inputs(f"{tmp_path}/*.md")


def test_which_sources_are_read_as_shards(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "00000.tar").write_bytes(b"")
    assert is_shard_source(str(tmp_path / "tars")) and is_shard_source("s3://bucket/data")
    assert is_shard_source("data/{00000..00009}.tar") and is_shard_source("data/part-*.parquet")
    assert not is_shard_source(str(tmp_path / "images")) and not is_shard_source("user/dataset")


def test_output_names_are_unique_and_readable():
    assert part_file("00012.tar", 3) == "data/00012-00003.parquet"
    nested, spaced = part_file("a/b.tar", 0), part_file("a b.parquet", 0)
    assert nested.startswith("data/a_b-") and nested != part_file("a_b.tar", 0) and spaced.startswith("data/a_b-")


def test_an_input_fingerprint_prefers_the_stores_content_hash_to_times():
    assert fingerprint({"size": 3, "ETag": '"abc"', "LastModified": "then"}) == 'size=3;ETag="abc"'
    assert fingerprint({"size": 3, "mtime": 1.5}) == "size=3;mtime=1.5"
    assert fingerprint({"size": 3, "blob_id": "b1", "last_commit": None}) == "size=3;blob_id=b1"
