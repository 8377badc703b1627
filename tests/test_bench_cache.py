"""scripts/bench_cache.py as a user runs it, on a handful of small generated images: the report holds the table,
is written under --out, and BENCHMARKS.md is left alone."""

from __future__ import annotations

import re

from script_loading import SCRIPTS, load_script


def test_report_is_written_and_printed_and_benchmarks_untouched(tmp_path, capsys):
    benchmarks = SCRIPTS.parent / "BENCHMARKS.md"
    before = benchmarks.read_bytes()
    script = load_script("bench_cache")
    args = ["--images", "4", "--size", "32", "--batch-size", "2", "--num-workers", "0", "--repeats", "1"]
    assert script.main([*args, "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report in capsys.readouterr().out
    assert "`python scripts/bench_cache.py --images 4 --size 32" in report
    row = re.search(r"\| preset:tiny \| cpu, fp32 \| 2 \| 0 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", report)
    assert row, report
    alone, end_to_end, ratio = map(float, row.groups())
    assert alone > 0 and end_to_end > 0 and abs(ratio - end_to_end / alone) <= 0.01 + 0.05 * ratio
    assert benchmarks.read_bytes() == before
