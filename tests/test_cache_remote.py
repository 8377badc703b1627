"""Caches read from and written to object storage: s3fs against an S3-compatible server on the loopback address
(moto's, started here), and fsspec's memory://. The rows must match those of a local cache of the same shards."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from cache_testing import tiny_model_dir
from shard_testing import build, rows, tar_bytes, write_tars

from codec.cache.locations import filesystem


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("remote_model"))


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on 127.0.0.1 at a free port; credentials and endpoint in the environment, as s3fs takes them."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield settings["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # its clients point at the stopped server


def _upload(url: str, shards: range) -> None:
    fs, root = filesystem(url)
    for shard in shards:
        fs.pipe_file(f"{root}/{shard:05d}.tar", tar_bytes(shard * 3, 3))


def test_a_cache_written_to_and_read_from_s3_matches_the_local_one(tmp_path, model_dir, s3_endpoint):
    fs, _ = filesystem("s3://bucket")
    fs.mkdir("bucket")
    _upload("s3://bucket/shards", range(4))
    remote = build("s3://bucket/shards/{00000..00003}.tar", "s3://bucket/cache", model_dir, num_workers=1)
    assert (remote.images, remote.rows, remote.written) == (12, 12, 8)
    local = build(write_tars(tmp_path / "shards", range(4))[0].parent, tmp_path / "local", model_dir)
    assert rows("s3://bucket/cache") == rows(tmp_path / "local")
    assert fs.cat_file("bucket/cache/skipped.jsonl") == b""
    assert local.rows == remote.rows

    stored = {path: fs.info(path)["ETag"] for path in fs.find("bucket/cache/data")}
    _upload("s3://bucket/shards", range(4, 5))
    grown = build("s3://bucket/shards/{00000..00004}.tar", "s3://bucket/cache", model_dir)
    assert (grown.reused, grown.written, grown.rows) == (8, 2, 15)
    fs.invalidate_cache()
    assert {path: fs.info(path)["ETag"] for path in stored} == stored  # existing parts untouched


def test_memory_urls_in_and_out_match_a_local_cache(tmp_path, model_dir):
    fs, _ = filesystem("memory://")
    for shard in range(3):
        fs.pipe_file(f"/in/{shard:05d}.tar", tar_bytes(shard * 3, 3, broken=(4,)))
    remote = build("memory://in/*.tar", "memory://out", model_dir)
    write_tars(tmp_path / "shards", range(3), broken=(4,))
    local = build(tmp_path / "shards", tmp_path / "local", model_dir)
    assert (remote.rows, remote.skipped) == (local.rows, local.skipped) == (8, 1)
    assert rows("memory://out") == rows(tmp_path / "local")
    assert fs.cat_file("/out/skipped.jsonl") == (tmp_path / "local" / "skipped.jsonl").read_bytes()
    again = build("memory://in/*.tar", "memory://out", model_dir)
    assert (again.written, again.reused) == (0, 6)
