"""`codec cache`: resume after interruption, refusing to mix, staleness, bad files, datasets, verify."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from cache_testing import (
    build,
    cli,
    folder_keys,
    image_folder,
    perturbed_copy,
    planned,
    read_rows,
    shard_files,
    shard_keys,
    smooth_image,
    tiny_model_dir,
)
from PIL import Image

import codec
from codec.cache import identity
from codec.cache.shards import CacheError
from codec.cache.verify import verify_cache

SIZES = [(32, 32), (40, 32), (32, 48), (64, 40), (36, 36), (48, 32), (32, 32), (56, 64), (32, 40), (44, 44)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("cache_model"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("cache_images") / "images", SIZES)


def test_interrupted_run_resumes_to_exactly_the_rows_of_an_uninterrupted_run(tmp_path, model_dir, folder):
    whole = build(folder, tmp_path / "whole", model_dir, buckets=True, bucket_step=16, flip=True)
    blocks = len(planned(folder_keys(folder)))
    assert blocks > 2 and (whole.written, whole.rows, whole.skipped, whole.shards) == (blocks, 10, 0, blocks)

    class Killed(Exception):
        pass

    def die_after_two(index: int) -> None:
        if index == 1:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        build(folder, out, model_dir, buckets=True, bucket_step=16, flip=True, on_shard_written=die_after_two)
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert not verify_cache(out).ok
    # What a process killed mid-write leaves: a temporary file, which the next run removes.
    (out / "data" / ".shard-00002.parquet.x1y2.tmp").write_bytes(b"half a shard")

    resumed = build(folder, out, model_dir, buckets=True, bucket_step=16, flip=True)
    assert (resumed.reused, resumed.written, resumed.rows) == (2, blocks - 2, 10)
    assert read_rows(out) == read_rows(tmp_path / "whole")
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(p.name for p in shard_files(tmp_path / "whole"))
    keys = [row["key"] for row in read_rows(out)]
    assert keys == sorted(p.name for p in folder.iterdir())  # no duplicate, no missing key
    assert verify_cache(out).ok
    again = build(folder, out, model_dir, buckets=True, bucket_step=16, flip=True)
    assert (again.reused, again.written) == (blocks, 0)


def test_cli_refuses_another_model_or_preprocessing_in_the_same_output(tmp_path, model_dir, folder):
    out = tmp_path / "out"
    base = ["cache", folder, "-o", out, "--resolution", 32, "--shard-size", 4, "--num-workers", 0, "--device", "cpu"]
    code, stdout, stderr = cli([*base, "--model", model_dir])
    assert code == 0, stderr
    assert f"10 of 10 images cached in {len(planned(folder_keys(folder), 4))} shards" in stdout
    before = read_rows(out)
    other = perturbed_copy(model_dir, tmp_path / "other")
    code, _, stderr = cli([*base, "--model", other])
    assert code == 2 and "refusing to mix" in stderr and "codec identity" in stderr
    code, _, stderr = cli([*base, "--model", model_dir, "--resolution", 64])
    assert code == 2 and "preprocessing resolution: cache has 32, this run has 64" in stderr
    code, _, stderr = cli([*base, "--model", model_dir, "--latent-dtype", "bf16"])
    assert code == 2 and "latent_dtype" in stderr
    code, _, stderr = cli([*base, "--model", model_dir, "--num-workers", -1])
    assert code == 2 and "--num-workers must be 0" in stderr  # had left the manifest marked incomplete
    code, _, stderr = cli([*base, "--model", model_dir, "--shard-size", 3])  # the last one given counts
    assert code == 2 and "shard_size: cache has 4, this run has 3" in stderr  # every block would move
    for flag in (["--bucket-step", 16], ["--bucket-step", 64], ["--max-aspect", 4]):  # even the defaults, if given
        code, _, stderr = cli([*base, "--model", tmp_path / "nowhere", *flag])  # refused before the model loads
        assert code == 2 and "add --buckets, or leave them out" in stderr
    code, _, stderr = cli(["stats", out, "--max-aspect", 2])  # a cache brings its own preprocessing
    assert code == 0, stderr
    assert read_rows(out) == before  # refused before touching anything
    code, stdout, _ = cli(["cache", "verify", out, "--model", model_dir])
    assert code == 0 and "OK, 10 rows" in stdout
    code, stdout, _ = cli(["cache", "verify", out, "--model", other])
    assert code == 1 and "made with codec" in stdout


def test_a_moved_source_folder_is_the_same_source_and_files_are_readable_by_others(tmp_path, model_dir):
    from codec.cache import manifest

    folder = image_folder(tmp_path / "images", SIZES[:4])
    out = tmp_path / "out"
    build(folder, out, model_dir)
    shard = shard_files(out)[0]
    before = shard.stat().st_mtime_ns
    moved = folder.rename(tmp_path / "elsewhere")
    summary = build(moved, out, model_dir)
    assert (summary.reused, summary.written) == (len(planned(folder_keys(moved))), 0)
    assert shard.stat().st_mtime_ns == before
    # Written through temporary files (mkstemp makes them 0600), yet with an ordinary new file's mode: other
    # users' training jobs read a cache.
    umask = os.umask(0)
    os.umask(umask)
    for path in (shard, out / "manifest.json", out / "skipped.jsonl"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    # The digest of the keys verify checks: a key boundary counts, and the format is fixed (old caches verify).
    assert manifest.keys_digest(["ab", "c"]) != manifest.keys_digest(["a", "bc"])
    assert manifest.keys_digest(["a"]) == "sha256:87428fc522803d31065e7bce3cf03fe475096631e5e07bbd7a0fde60c4cf25c7"


def test_a_shard_whose_footer_has_another_shape_is_encoded_again(tmp_path, model_dir):
    import pyarrow.parquet as pq

    from codec.cache.shards import META_KEY

    folder = image_folder(tmp_path / "images", SIZES[:4])
    out = tmp_path / "out"
    build(folder, out, model_dir)
    before = read_rows(out)
    shard = shard_files(out)[0]
    table = pq.read_table(shard)
    pq.write_table(table.replace_schema_metadata({META_KEY: b'{"compat": "old", "record": null}'}), shard)
    summary = build(folder, out, model_dir)  # had raised AttributeError from inside the shard check
    assert (
        (summary.reused, summary.written) == (len(planned(folder_keys(folder))) - 1, 1)
        and read_rows(out) == before
        and verify_cache(out).ok
    )


def test_shards_without_their_manifest_still_refuse_another_model(tmp_path, model_dir, folder):
    out = tmp_path / "out"
    build(folder, out, model_dir)
    first = min(path.name for path in shard_files(out))  # the first file found
    (out / "manifest.json").unlink()
    other = perturbed_copy(model_dir, tmp_path / "other")
    with pytest.raises(CacheError, match=rf"{first} was made with different settings.*resolution: cache has 32"):
        build(folder, out, model_dir, resolution=64)
    with pytest.raises(CacheError, match="codec identity"):
        build(folder, out, other)
    blocks = len(planned(folder_keys(folder)))
    assert len(list((out / "data").glob("*.parquet"))) == blocks and not (out / "manifest.json").exists()
    assert build(folder, out, model_dir).reused == blocks  # the same settings adopt them


def test_changed_files_make_only_their_shard_stale_and_a_shrunk_source_drops_shards(tmp_path, model_dir):
    folder = image_folder(tmp_path / "images", SIZES[:7])
    out = tmp_path / "out"
    build(folder, out, model_dir)
    first = {row["key"]: row for row in read_rows(out)}
    blocks = planned(folder_keys(folder))
    assert len(blocks) > 2
    stamps = {path: path.stat().st_mtime_ns for path in shard_files(out)}
    holding = next(path for path in stamps if "img004.png" in shard_keys(path))
    Image.fromarray(smooth_image(99, 32, 32)).save(folder / "img004.png")
    os.utime(folder / "img004.png", ns=(1, 1))  # a new mtime even on a coarse clock
    summary = build(folder, out, model_dir)
    assert (summary.reused, summary.written) == (len(blocks) - 1, 1)
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items() if path != holding)
    second = {row["key"]: row for row in read_rows(out)}
    assert second["img004.png"]["mean"] != first["img004.png"]["mean"]
    assert all(second[key] == first[key] for key in first if key != "img004.png")
    stamps = {tuple(shard_keys(path)): (path, path.stat().st_mtime_ns) for path in shard_files(out)}
    for name in ("img006.png", "img005.png"):
        (folder / name).unlink()
    summary = build(folder, out, model_dir)
    remaining = planned(folder_keys(folder))
    assert summary.shards == len(remaining) and [shard_keys(path) for path in shard_files(out)] == remaining
    assert sorted((out / "data").glob("*.parquet")) == sorted(shard_files(out))  # the emptied blocks' files gone
    kept = [stamps[tuple(block)] for block in remaining if tuple(block) in stamps]
    assert kept and all(path.stat().st_mtime_ns == stamp for path, stamp in kept)  # untouched blocks untouched
    assert summary.written == len(remaining) - len(kept)
    assert [row["key"] for row in read_rows(out)] == [f"img00{i}.png" for i in range(5)]
    assert verify_cache(out).ok


def test_a_rerun_clears_its_own_leftovers_but_not_another_tools_files(tmp_path, model_dir, folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    build(folder, out, model_dir)
    leftover = out / ".manifest.json.x1y2.tmp"  # a run killed while writing its manifest
    leftover.write_text("{")
    foreign = out / "data" / "shard-00099.parquet"
    pq.write_table(pa.table({"a": [1]}), foreign)
    skipped_leftover = out / ".skipped.jsonl.a1b2.tmp"  # ... or its list of skipped images
    skipped_leftover.write_text("{")
    assert build(folder, out, model_dir).written == 0
    assert not leftover.exists() and not skipped_leftover.exists()
    assert pq.read_table(foreign).to_pylist() == [{"a": 1}]


def test_a_rerun_with_nothing_to_do_never_marks_the_cache_incomplete(tmp_path, model_dir, folder, monkeypatch):
    from codec.cache import manifest

    out = tmp_path / "out"
    build(folder, out, model_dir)
    written = []
    real = manifest.write_manifest

    def write_then_die(path, data):  # a run killed just after each manifest it writes
        real(path, data)
        written.append(data["complete"])
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest, "write_manifest", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(folder, out, model_dir)
    assert written == [True]  # only the final one: a trainer starting meanwhile still finds a complete cache
    assert len(codec.LatentDataset(out, codec=codec.AutoencoderKL.load(model_dir))) == len(SIZES)

    # A source that lost its last shard's images: nothing to encode, but a shard to remove, so the cache is marked
    # incomplete before the shard goes (a reader would otherwise find a complete manifest naming a missing file).
    shrunk = tmp_path / "shrunk"
    shutil.copytree(folder, shrunk)
    monkeypatch.setattr(manifest, "write_manifest", real)
    build(shrunk, tmp_path / "out2", model_dir)
    blocks = planned(folder_keys(shrunk))
    # An image alone in its block, whose removal leaves every other block as it was: nothing to encode.
    alone = next(
        b[0]
        for b in blocks
        if len(b) == 1
        and planned(k for k in folder_keys(shrunk) if k != b[0]) == [other for other in blocks if other != b]
    )
    (shrunk / alone).unlink()
    monkeypatch.setattr(manifest, "write_manifest", write_then_die)
    written.clear()
    with pytest.raises(KeyboardInterrupt):
        build(shrunk, tmp_path / "out2", model_dir)
    assert written == [False] and len(list((tmp_path / "out2" / "data").glob("shard-*.parquet"))) == len(blocks)


def _png_bomb(path: Path) -> None:
    """A tiny PNG whose header claims 30000 x 30000 pixels: opening it must refuse, not allocate 2.7 GB."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_bad_files_are_skipped_and_reported_and_awkward_modes_are_cached(tmp_path, model_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    good = smooth_image(1, 40, 32)
    Image.fromarray(good).save(folder / "good.jpg")
    rgba = np.dstack([good, np.full(good.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(good).convert("P").save(folder / "palette.png")
    Image.fromarray(good).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(good[:, :, 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(good[:, :, 0]).save(folder / "grey.png")
    rotated = Image.fromarray(smooth_image(2, 32, 64))  # stored 64 wide; EXIF says rotate: shown 32 wide, 64 tall
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "exif.jpg", exif=exif)
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes((folder / "good.jpg").read_bytes()[:300])
    (folder / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    (folder / "notes.jpg").write_text("this is text, not a picture")
    _png_bomb(folder / "bomb.png")

    out = tmp_path / "out"
    args = ["cache", folder, "-o", out, "--model", model_dir, "--resolution", 32, "--num-workers", 0, "--device", "cpu"]
    code, stdout, stderr = cli(args)
    assert code == 0, stderr
    assert "7 of 12 images cached" in stdout and "skipped 5 unreadable images" in stdout
    reasons = {e["key"]: e["reason"] for e in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert sorted(reasons) == ["bomb.png", "empty.png", "noise.png", "notes.jpg", "truncated.jpg"]
    assert "empty" in reasons["empty.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "truncated or corrupt" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.jpg"] and "not an image" in reasons["noise.png"]
    rows = {row["key"]: row for row in read_rows(out)}
    assert rows["exif.jpg"]["original_size"] == [64, 32]
    assert all(np.isfinite(np.asarray(row["mean"], dtype=np.float32)).all() for row in rows.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"images": 12, "rows": 7, "skipped": 5, "shards": 1}
    code, stdout, _ = cli(["cache", "verify", out])
    assert code == 0 and "7 rows and 5 skipped" in stdout

    code, stdout, _ = cli([*args[:3], tmp_path / "small", *args[4:], "--max-pixels", 1500])
    assert code == 0 and "skipped 6" in stdout  # the five bad files, and the 32x64 image is over 1500 pixels
    lines = (tmp_path / "small" / "skipped.jsonl").read_text().splitlines()
    reasons = {e["key"]: e["reason"] for e in map(json.loads, lines)}
    assert reasons["exif.jpg"].startswith("too many pixels (64x32 > 1500)")


def test_dataset_source_carries_columns_and_datasets_reads_the_cache(tmp_path, model_dir, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = [Image.fromarray(smooth_image(i, 32 + 8 * i, 32)) for i in range(4)]
    table = datasets.Dataset.from_dict(
        {"image": images, "caption": [f"photo {i}" for i in range(4)], "label": [3, 1, 4, 1]}
    ).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    code, _, stderr = cli(
        ["cache", tmp_path / "saved", "-o", out, "--model", model_dir, "--resolution", 32, "--num-workers", 0]
    )
    assert code == 0, stderr
    loaded = datasets.load_dataset(
        "parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded["key"] == [f"{i:09d}" for i in range(4)]
    assert loaded["caption"] == [f"photo {i}" for i in range(4)] and loaded["label"] == [3, 1, 4, 1]
    row = loaded.with_format("numpy")[2]
    assert loaded.features["mean"].feature.dtype == "float16"
    assert row["mean"].size == int(np.prod(row["shape"])) == 4 * 4 * 4
    assert list(row["original_size"]) == [48, 32]
    code, _, stderr = cli(
        ["cache", tmp_path / "saved", "-o", tmp_path / "o2", "--model", model_dir, "--columns", "nope"]
    )
    assert code == 2 and "cannot carry column(s) ['nope']" in stderr


def test_verify_finds_missing_extra_and_corrupt_shards(tmp_path, model_dir, folder):
    out = tmp_path / "out"
    build(folder, out, model_dir)
    assert verify_cache(out).ok
    shard, other = shard_files(out)[1:3]
    data = shard.read_bytes()
    shard.write_bytes(data[:100] + b"\0" * 50 + data[150:])
    problems = " ".join(verify_cache(out).problems)
    assert shard.name in problems
    shard.write_bytes(data)
    (out / "data" / "shard-00099.parquet").write_bytes(data)
    assert "does not list" in " ".join(verify_cache(out).problems)
    (out / "data" / "shard-00099.parquet").unlink()
    shard.rename(other)  # a shard in another block's place
    problems = " ".join(verify_cache(out).problems)
    assert "missing" in problems and "as another shard" in problems


def test_file_list_keys_are_its_lines_and_a_hub_name_offline_fails_plainly(tmp_path, model_dir, folder, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text(f"# two images\n{folder / 'img003.png'}\n../missing.png\n")
    summary = build(lists / "train.txt", tmp_path / "out", model_dir)
    assert (summary.rows, summary.skipped) == (1, 1)
    assert [row["key"] for row in read_rows(tmp_path / "out")] == [str(folder / "img003.png")]
    skipped = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())
    assert skipped["key"] == "../missing.png" and skipped["reason"] == "no such file"
    (lists / "twice.txt").write_text("a.png\n./a.png\n")
    code, _, stderr = cli(["cache", lists / "twice.txt", "-o", tmp_path / "o2", "--model", model_dir])
    assert code == 2 and "line 2 names './a.png' again (first on line 1)" in stderr
    import datasets

    def offline(*args, **kwargs):  # HF_HUB_OFFLINE is read when datasets is imported: too late here to set it
        raise ConnectionError("Couldn't reach 'nobody/no-such-dataset' on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code, _, stderr = cli(["cache", "nobody/no-such-dataset", "-o", tmp_path / "o3", "--model", model_dir])
    assert code == 2 and "cannot load the dataset 'nobody/no-such-dataset'" in stderr


def test_images_smaller_than_their_bucket_are_counted_and_the_cli_warns(tmp_path, model_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(smooth_image(1, 16, 40)).save(folder / "short.png")  # 16 tall: enlarged to cover 32x32
    Image.fromarray(smooth_image(2, 48, 40)).save(folder / "large.png")  # covers 32x32 when scaled down
    common = ["--model", model_dir, "--resolution", 32, "--num-workers", 0, "--device", "cpu"]
    code, stdout, stderr = cli(["cache", folder, "-o", tmp_path / "out", *common])
    assert code == 0, stderr
    assert "warning: 1 of 2 images were smaller than their bucket" in stdout
    code, stdout, stderr = cli(["stats", folder, *common])
    assert code == 0, stderr
    assert "warning: 1 of 2 images were smaller" in stdout
    code, stdout, stderr = cli(["stats", tmp_path / "out"])  # the cache itself, as --write-config reads it
    assert code == 0, stderr
    assert "warning: 1 of 2 images were smaller than their bucket (about 32x32)" in stdout
    code, stdout, _ = cli(["cache", folder, "-o", tmp_path / "at16", *common[:2], "--resolution", 16, *common[4:]])
    assert code == 0 and "warning" not in stdout


def _identities_before_0_2(vae) -> dict[str, str]:
    """What model_identities recorded before 0.2: every weight, the decoder's included, hashed."""
    state = list(vae.state_dict().items())
    return {name: identity._hash(vae.config, state, dtype, legacy=True) for dtype, name in identity.DTYPE_NAMES.items()}


def test_a_cache_written_before_encoder_identities_stays_valid(tmp_path, model_dir, folder):
    out = tmp_path / "out"
    first = build(folder, out, model_dir, identities=_identities_before_0_2)
    recorded = json.loads((out / "manifest.json").read_text())["codec"]["identity"]
    assert identity.is_legacy(recorded)
    again = build(folder, out, model_dir)  # this version, the same codec: every shard stays current
    assert (again.reused, again.written) == (first.written, 0)
    assert json.loads((out / "manifest.json").read_text())["codec"]["identity"] == recorded
    vae = codec.AutoencoderKL.load(model_dir)
    assert len(codec.LatentDataset(out, codec=vae.half())) == len(SIZES)
    import diffusers  # its AutoencoderKL registers the same weights in another order: compared in ours

    assert len(codec.LatentDataset(out, codec=diffusers.AutoencoderKL.from_pretrained(model_dir))) == len(SIZES)
    assert verify_cache(out, vae).ok
    code, stdout, _ = cli(["cache", "verify", out, "--model", model_dir])
    assert code == 0 and "OK, 10 rows" in stdout
    other = codec.AutoencoderKL.load(perturbed_copy(model_dir, tmp_path / "other"))
    with pytest.raises(CacheError, match="encoded with codec sha256:"):
        codec.LatentDataset(out, codec=other)
    with pytest.raises(CacheError, match="codec identity"):
        build(folder, out, tmp_path / "other")


def test_a_manifest_edited_into_another_shape_is_named_not_a_type_error(tmp_path, model_dir, folder):
    from codec.cache.stats import cache_stats

    out = tmp_path / "out"
    build(folder, out, model_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    for field, value in (("codec", 5), ("counts", "x"), ("shards", [3])):
        (out / "manifest.json").write_text(json.dumps({**manifest, field: value}))
        report = verify_cache(out)
        assert not report.ok and f"not the manifest `codec cache` writes ({field}" in " ".join(report.problems)
        for attempt in (
            lambda: codec.LatentDataset(out, codec=None),
            lambda: cache_stats(out),
            lambda: build(folder, out, model_dir),
        ):
            with pytest.raises(CacheError, match=f"not the manifest `codec cache` writes \\({field}"):
                attempt()
