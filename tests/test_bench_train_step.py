"""scripts/bench_train_step.py on the tiny preset: each variant's step is timed and trains (its weights move),
and the report is written under --out."""

from __future__ import annotations

import re

import pytest
import torch
from script_loading import load_script


def test_a_step_changes_the_weights():
    script = load_script("bench_train_step")
    model = script.models(script.load_architecture("tiny"), torch.device("cpu"), with_diffusers=False)["ours"]
    before = [p.detach().clone() for p in model.parameters()]
    step = script.step_function(model, torch.rand(1, 3, 32, 32) * 2 - 1, autocast=None)
    step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_report_has_a_row_per_model_and_precision(tmp_path, capsys):
    pytest.importorskip("diffusers")
    script = load_script("bench_train_step")
    args = ["--config", "tiny", "--batch", "1", "--size", "32", "--precisions", "fp32", "--repeats", "2"]
    assert script.main([*args, "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report in capsys.readouterr().out
    number = r"([\d.e-]+)"
    rows = re.findall(rf"\| fp32 \| (ours|diffusers) \| {number} \| {number} \| {number}, {number} \|", report)
    assert [name for name, *_ in rows] == ["ours", "diffusers"]
    for _, median, best, first, second in rows:
        assert float(median) == pytest.approx((float(first) + float(second)) / 2, rel=0.01)
        assert float(best) == pytest.approx(min(float(first), float(second)), rel=0.01)
