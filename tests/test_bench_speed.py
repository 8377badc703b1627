"""scripts/bench_speed.py as a user runs it (--quick: tiny config, small images): the report it prints holds
every section, the timings are real numbers, and the tiling difference picture is written."""

from __future__ import annotations

import re

import pytest
from script_loading import load_script

pytest.importorskip("diffusers")


def test_quick_run_prints_all_sections_and_writes_the_difference_picture(tmp_path, capsys):
    script = load_script("bench_speed")
    assert script.main(["--quick", "--no-write", "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
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
    assert re.search(r"\| \S+: bf16 decode vs fp32 decode, 128x128 \| [\d.]+ \|", report)
    assert re.search(r"\| \S+: tiled decode \(tile 8 latent px\) vs untiled, 128x128 \| [\d.]+ \|", report)
    assert len(list(tmp_path.glob("tiled-minus-untiled-x8-*.png"))) == 1
    # The machine line names the vector instructions: bf16's ratios hinge on them.
    import torch

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
