"""scripts/bench_plan.py: the planning table it prints (the throughput half encodes, so it is left to the script)."""

from __future__ import annotations

import pytest
from script_loading import load_script


@pytest.mark.slow  # six fresh processes, each importing torch: about 25 s on 2 cores
def test_planning_table_has_a_row_per_item_count_with_times_and_memory(tmp_path, monkeypatch, capsys):
    bench = load_script("bench_plan")
    monkeypatch.setattr(bench, "OUT", tmp_path)
    assert bench.main(["--items", "1000", "3000", "--items-per-shard", "1000", "--skip-throughput"]) == 0
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 1,000") or line.startswith("| 3,000")
    ]
    assert len(lines) == 2 and lines[1].startswith("| 3,000 (3 shards) |")
    assert all(len(line.split("|")) == 9 for line in lines)  # items, then seconds and MB for three planners
    assert sorted(p.name for p in (tmp_path / "plan" / "shards-3000").iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
