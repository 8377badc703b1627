"""scripts/bench_reader.py: its synthetic cache is a cache both readers take, and a run reports every mode."""

from __future__ import annotations

import json

import pytest
from script_loading import load_script

import codec


def test_the_synthetic_cache_reads_like_a_real_one(tmp_path):
    bench = load_script("bench_reader")
    summary = bench.build_synthetic_cache(tmp_path / "cache", 200_000, (4, 16, 16), shard_size=40)
    assert summary["rows"] == 49 and summary["shards"] == 2  # 200 kB / (4x16x16 fp16 x 2 columns)
    dataset = codec.LatentDataset(tmp_path / "cache", codec=None, posterior="mean")
    assert len(dataset) == 49 and len(dataset.buckets) == 3
    assert {tuple(dataset[i]["latents"].shape) for i in range(len(dataset))} == {(4, 16, 16), (4, 14, 18), (4, 18, 14)}
    stream = codec.LatentStream(tmp_path / "cache", codec=None, batch_size=8)
    assert sum(len(batch["key"]) for batch in stream) == 49


@pytest.mark.slow
def test_a_run_reports_each_mode(tmp_path, capsys):
    bench = load_script("bench_reader")
    argv = ["--out", str(tmp_path), "--size-gb", "0.001", "--shape", "4", "16", "16", "--workers", "1"]
    assert bench.main([*argv, "--shard-size", "40", "--modes", "all", "bounded"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["mode"] for r in results] == ["all", "bounded"] and all(r["items"] > 0 for r in results)
    assert "| bounded |" in capsys.readouterr().out and not (tmp_path / "cache").exists()
