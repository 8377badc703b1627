"""scripts/bench_speed.py as a user runs it (--quick: tiny config, small images): the report it prints and writes
holds every section, the timings are real numbers, and BENCHMARKS.md is left alone."""

from __future__ import annotations

import re

import pytest
from script_loading import SCRIPTS, load_script

pytest.importorskip("diffusers")


def test_quick_run_prints_and_writes_the_report(tmp_path, capsys):
    import torch

    benchmarks = SCRIPTS.parent / "BENCHMARKS.md"
    before = benchmarks.read_bytes()
    script = load_script("bench_speed")
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report in capsys.readouterr().out
    assert benchmarks.read_bytes() == before
    speed_rows = [
        line for line in report.splitlines() if re.match(r"\| (encode|decode) \| 64x64 \| 1 \| (fp32|bf16)", line)
    ]
    assert len(speed_rows) == 4
    for row in speed_rows:
        ours, theirs, ratio = (float(cell) for cell in row.split("|")[5:8])
        assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, rel=0.1)  # cells are rounded
        # A share of the peak of what actually ran: where bf16 is emulated, ours runs fp32 (it read 1543%).
        share = int(re.search(r"\((\d+)%\)", row).group(1))
        assert 0 <= share <= 150, row
    assert re.search(r"\| 128x128 \| ours tiled \| [\d.]+ \| [\d.]+ \|", report)
    assert "`python scripts/bench_speed.py --quick --out " in report
    # The machine line names the vector instructions: bf16's ratios hinge on them.
    assert f"({torch.backends.cpu.get_cpu_capability()}, " in report and "native bf16)" in report


def test_alternating_timer_runs_each_callable_after_a_warm_up():
    import torch

    script = load_script("bench_speed")
    calls = []
    timings = script.time_alternating(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, torch.device("cpu")
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then the order flips each round
    assert all(len(t.seconds) == 3 for t in timings.values())
