"""`codec cache --engine ray`: the default engine's cache, written by a Ray Data pipeline on a local Ray."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from cache_testing import cli, tiny_model_dir
from shard_testing import image_bytes, rows, write_tars

import codec
from codec.cache import LatentDataset
from codec.cache.by_input import build_by_input
from codec.cache.identity import model_identities
from codec.cache.preprocess import Preprocessing
from codec.cache.ray_engine import build_with_ray
from codec.cache.ray_stages import Encoder
from codec.cache.shard_sources import open_shard_source
from codec.cache.writer import CacheModel, Settings

LATENTS = ("mean", "logvar", "flip_mean", "flip_logvar")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("ray_model"))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _mixed_tar(path: Path) -> None:
    """Images of five shapes, so that buckets mix within a batch."""
    with tarfile.open(path, "w") as tar:
        for index, (height, width) in enumerate([(32, 48), (48, 32), (32, 32), (40, 56), (56, 40)]):
            data = image_bytes(100 + index, height, width)
            info = tarfile.TarInfo(f"{index:05d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _build(engine, shards: Path, out: Path, model_dir: Path, **run):
    """build_by_input or build_with_ray with the settings OPTIONS gives the command line."""
    vae = codec.AutoencoderKL.load(model_dir)
    preprocessing = Preprocessing(32, buckets=True, bucket_step=8, flip=True)
    settings = Settings(preprocessing, batch_size=2, shard_size=2, progress=False)
    model = CacheModel(vae, model_identities(vae), str(model_dir))
    return engine(open_shard_source(str(shards)), str(out), model, settings, **run)


OPTIONS = ["--resolution", 32, "--buckets", "--bucket-step", 8, "--flip", "--shard-size", 2, "--batch-size", 2]


@pytest.fixture(scope="module")
def shards_and_default(tmp_path_factory, model_dir) -> tuple[Path, Path]:
    """Two tars of 5 images (one not an image) and one of mixed shapes, and their cache by the default engine."""
    folder = tmp_path_factory.mktemp("ray_shards")
    write_tars(folder / "shards", range(2), per_shard=5, broken=(2,))
    _mixed_tar(folder / "shards" / "00002.tar")
    _build(build_by_input, folder / "shards", folder / "default", model_dir)
    return folder / "shards", folder / "default"


def _assert_same_rows(found: list[dict], expected: list[dict]) -> None:
    """The same rows, latents equal within fp16 storage (one unit in the last place) and all else exactly."""
    assert [row["key"] for row in found] == [row["key"] for row in expected]
    for row, other in zip(found, expected, strict=True):
        assert {k: v for k, v in row.items() if k not in LATENTS} == {
            k: v for k, v in other.items() if k not in LATENTS
        }
        for name in LATENTS:
            a, b = (torch.tensor(r[name], dtype=torch.float32) for r in (row, other))
            torch.testing.assert_close(a, b, rtol=2**-10, atol=2**-14, msg=f"{row['key']} {name}")


def _without_checksums(manifest: dict) -> dict:
    entries = [{k: v for k, v in entry.items() if k != "checksum"} for entry in manifest["shards"]]
    return {**manifest, "shards": entries}


def test_engine_ray_writes_the_default_engines_cache(tmp_path, model_dir, local_ray, shards_and_default):
    shards, default = shards_and_default
    out = tmp_path / "ray"
    options = ["--model", model_dir, *OPTIONS, "--engine", "ray", "--decoders", 1]
    code, stdout, stderr = cli(["cache", shards, "-o", out, *options])
    assert code == 0, stderr
    assert "14 of 15 images cached in 9 shards (0 already done, 9 written now)" in stdout
    assert "skipped 1 unreadable images" in stdout
    _assert_same_rows(rows(out), rows(default))
    assert len({tuple(row["bucket"]) for row in rows(out)}) >= 3  # batches of mixed buckets were encoded
    assert (out / "skipped.jsonl").read_bytes() == (default / "skipped.jsonl").read_bytes()
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(p.name for p in (default / "data").iterdir())
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (out, default)]
    assert _without_checksums(manifests[0]) == _without_checksums(manifests[1])  # nothing tells the engines apart
    code, stdout, _ = cli(["cache", "verify", out, "--model", model_dir])
    assert code == 0 and "OK, 14 rows and 1 skipped in 9 shards" in stdout
    dataset = LatentDataset(out, codec=codec.AutoencoderKL.load(model_dir))
    assert len(dataset) == 14 and dataset[0]["key"] == "00000.tar/000000000"


def test_a_killed_ray_run_is_finished_by_either_engine(tmp_path, model_dir, local_ray, shards_and_default):
    shards, default = shards_and_default

    class Killed(Exception):
        pass

    def die(entry: dict) -> None:
        raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        _build(build_with_ray, shards, out, model_dir, on_part_written=die)
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    shutil.copytree(out, tmp_path / "copy")
    resumed = _build(build_with_ray, shards, out, model_dir)
    assert (resumed.reused, resumed.written) == (1, 8)
    _assert_same_rows(rows(out), rows(default))
    by_default = _build(build_by_input, shards, tmp_path / "copy", model_dir)
    assert (by_default.reused, by_default.written) == (1, 8)
    _assert_same_rows(rows(tmp_path / "copy"), rows(default))
    for folder in (out, tmp_path / "copy"):
        assert (folder / "skipped.jsonl").read_bytes() == (default / "skipped.jsonl").read_bytes()
        assert cli(["cache", "verify", folder])[0] == 0


class DiesOnce(Encoder):
    """An encoder whose process exits on its first batch, once (a marker file remembers it died)."""

    marker = ""

    def __call__(self, batch: dict) -> dict:
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().__call__(batch)


def test_an_encoder_that_dies_is_replaced_and_every_row_is_cached(tmp_path, model_dir, local_ray, shards_and_default):
    shards, default = shards_and_default
    DiesOnce.marker = str(tmp_path / "died")
    summary = _build(build_with_ray, shards, tmp_path / "out", model_dir, encoder=DiesOnce)
    assert (tmp_path / "died").exists()  # it did die
    assert (summary.rows, summary.skipped, summary.written) == (14, 1, 9)
    _assert_same_rows(rows(tmp_path / "out"), rows(default))


def test_engine_ray_refusals_come_before_the_model_loads(tmp_path, monkeypatch):
    write_tars(tmp_path / "shards", range(1))
    (tmp_path / "images").mkdir()
    base = ["cache", tmp_path / "shards", "-o", tmp_path / "out", "--model", tmp_path / "no-model"]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, stderr = cli([*base, "--engine", "ray"])
    assert code == 2 and "pip install 'latent-codec[ray]'" in stderr
    code, _, stderr = cli([*base, "--encoders", 2])
    assert code == 2 and "options of --engine ray" in stderr
    code, _, stderr = cli(["cache", tmp_path / "images", *base[2:], "--engine", "ray"])
    assert code == 2 and "--engine ray encodes input shards" in stderr
    assert not (tmp_path / "out").exists()


def test_codec_and_the_default_engine_never_import_ray():
    code = (
        "import sys, codec, codec.cache.by_input, codec.cache.ray_engine, codec.cli.cache; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


class _Cluster:
    def __init__(self, **resources) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict:
        return self.resources


def test_encoders_take_the_clusters_gpus_and_what_it_cannot_hold_is_refused():
    from codec.cache.ray_engine import RayOptions, _resources

    found = _resources(_Cluster(CPU=64, GPU=8), RayOptions())
    assert (found.encoders, found.gpus_per_encoder) == (8, 1.0)
    assert _resources(_Cluster(CPU=64, GPU=8), RayOptions(gpus_per_encoder=0.5)).encoders == 16
    found = _resources(_Cluster(CPU=8), RayOptions())
    assert (found.encoders, found.gpus_per_encoder) == (1, 0.0)
    for cluster, options in [
        (_Cluster(CPU=64, GPU=8), RayOptions(encoders=9)),
        (_Cluster(CPU=8), RayOptions(gpus_per_encoder=1)),
        (_Cluster(CPU=2), RayOptions(encoders=2)),
        (_Cluster(CPU=8), RayOptions(decoders=0)),
    ]:
        with pytest.raises(ValueError):
            _resources(cluster, options)
