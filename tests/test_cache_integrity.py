"""`codec cache verify` against a shard changed in place: checksums recorded at write time, values within a codec's
range, rows named; caches written before checksums still verify; verify and stats show progress on a terminal."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from cache_testing import build, cli, image_folder, shard_files, shard_keys, tiny_model_dir

from codec.cache.stats import cache_stats
from codec.cache.verify import verify_cache


def _shard(out: Path) -> Path:
    """A shard past the first, of two rows at least: the one these tests change."""
    return next(path for path in shard_files(out)[1:] if len(shard_keys(path)) >= 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("integrity_model"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("integrity_images") / "images", [(32, 32), (40, 32), (32, 48)] * 3)


@pytest.fixture
def cache(tmp_path, model_dir, folder) -> Path:
    out = tmp_path / "out"
    build(folder, out, model_dir)  # 9 images, in blocks of about 3
    return out


def _table(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _column_chunk(path: Path, name: str) -> tuple[int, int]:
    """Where the column's data lies in the file: (start, length)."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata.row_group(0)
    column = next(
        metadata.column(i)
        for i in range(metadata.num_columns)
        if metadata.column(i).path_in_schema.split(".")[0] == name
    )
    return column.data_page_offset, column.total_compressed_size


def _flip_a_value_in_place(path: Path) -> np.ndarray:
    """Flip the low bit of one byte of the `mean` column's data where the file still decodes, its values still
    finite and small (the change no shape or range check can see); returns the changed rows' indices."""
    original = path.read_bytes()
    before = _table(path).column("mean").to_pylist()
    start, length = _column_chunk(path, "mean")
    for offset in range(start + length - 1, start, -1):  # values sit at the chunk's end, after the page header
        changed = bytearray(original)
        changed[offset] ^= 0x01
        path.write_bytes(bytes(changed))
        try:
            after = _table(path).column("mean").to_pylist()
        except Exception:  # a flip the decoder refuses: verify calls the shard unreadable already
            continue
        values = np.concatenate([np.asarray(row, dtype=np.float32) for row in after])
        rows = np.flatnonzero([a != b for a, b in zip(after, before, strict=True)])
        if len(rows) and np.isfinite(values).all() and np.abs(values).max() < 100:
            return rows
    raise AssertionError("no byte of the mean column could be flipped into a readable, changed shard")


def test_a_value_flipped_in_place_fails_verify_naming_the_shard_and_row(cache):
    assert verify_cache(cache).ok
    manifest = json.loads((cache / "manifest.json").read_text())
    assert all(entry["checksum"].startswith("sha256:") for entry in manifest["shards"])
    shard = _shard(cache)
    keys = _table(shard).column("key").to_pylist()
    rows = _flip_a_value_in_place(shard)
    report = verify_cache(cache)
    assert not report.ok
    problem = " ".join(report.problems)
    assert shard.name in problem and "checksum mismatch" in problem
    assert all(repr(keys[row]) in problem for row in rows)
    assert sum(repr(key) in problem for key in keys) == len(rows)  # only the changed row(s) are named
    code, stdout, _ = cli(["cache", "verify", cache])
    assert code == 1 and shard.name in stdout


def _as_written_before_checksums(out: Path, huge_row: int | None = None) -> None:
    """Drop every checksum from the manifest and the footers, as a cache of an earlier version has none; with
    `huge_row`, that row of _shard(out) gets 56288 in its mean, as a flipped exponent bit gave."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    changed = _shard(out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop("checksum")
        path = out / entry["file"]
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"latent_codec"])
        meta.pop("checksum"), meta.pop("row_checksums")
        if huge_row is not None and path == changed:
            means = table.column("mean").to_pylist()
            means[huge_row][3] = 56288.0
            index = table.column_names.index("mean")
            table = table.set_column(index, "mean", pa.array(means, type=table.schema.field("mean").type))
        table = table.replace_schema_metadata({b"latent_codec": json.dumps(meta).encode()})
        pq.write_table(table, path)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_a_cache_without_checksums_verifies_and_says_the_check_was_skipped(cache):
    shards = len(shard_files(cache))
    _as_written_before_checksums(cache)
    report = verify_cache(cache)
    assert report.ok and report.unchecked == shards > 2
    code, stdout, _ = cli(["cache", "verify", cache])
    assert code == 0 and f"checksum check skipped for {shards} shard(s)" in stdout


def test_a_huge_value_fails_the_range_check_naming_the_shard_and_row(cache):
    shard = _shard(cache)
    keys = _table(shard).column("key").to_pylist()
    _as_written_before_checksums(cache, huge_row=1)
    report = verify_cache(cache)
    assert not report.ok and report.unchecked == len(shard_files(cache))
    (problem,) = report.problems
    assert shard.name in problem and "'mean'" in problem and "outside [-10000, 10000]" in problem
    assert repr(keys[1]) in problem and repr(keys[0]) not in problem


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_verify_and_stats_show_progress_on_a_terminal(cache):
    for run, label in ((lambda: verify_cache(cache), "verify"), (lambda: cache_stats(cache), "stats")):
        terminal = _Terminal()
        with contextlib.redirect_stderr(terminal):
            run()
        assert f"{label}: 100%" in terminal.getvalue() and "9/9" in terminal.getvalue()
        quiet = io.StringIO()  # not a terminal (a log file, a pipe): no bar
        with contextlib.redirect_stderr(quiet):
            run()
        assert quiet.getvalue() == ""
