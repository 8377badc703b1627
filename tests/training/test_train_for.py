"""scripts/train_for.py: it times the recipe, sizes run.max_steps to the budget, and the run it starts is an
ordinary one (config.yaml records the chosen steps, the export is there)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml
from script_loading import load_script

from training.config import load_config

REPO = Path(__file__).resolve().parents[2]
FAST = ["data.resolution=32", "run.batch_size=2", "loss.lpips_weight=0.0", "run.checkpoint_every=1000"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # tiny.yaml names its data relative to the repository root


def test_steps_fill_the_budget_less_start_up_margin_and_validation():
    script = load_script("train_for")
    config = load_config("tiny", ["run.batch_size=8", "data.validation_images=24", "run.validate_every=100"])
    timing = script.StepTime(per_step=0.5, fixed=20.0)
    # (600 * 0.9 - 20) s at 0.5 s per step, each step carrying 1% of a validation (24 / (3 * 8) / 100).
    assert script.steps_within(600, timing, config, margin=0.1) == int(520 / (0.5 * 1.01))
    assert script.steps_within(10, timing, config, margin=0.1) == 1  # never zero steps


def test_a_budgeted_run_records_its_steps_and_exports(tmp_path, capsys):
    script = load_script("train_for")
    out = tmp_path / "run"
    budget_s = 20
    start = time.perf_counter()
    overrides = [*FAST, f"run.output_dir={out}", "optimizer.warmup_steps=50", "run.validate_every=40"]
    assert script.main(["--minutes", str(budget_s / 60), "--config", "tiny", *overrides]) == 0
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out
    steps, warmup = map(int, re.search(r"-> (\d+) steps \(warm-up (\d+)\)", printed).groups())
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["run"]["max_steps"] == steps > 25  # more than the trial runs: the budget was used
    assert recorded["optimizer"]["warmup_steps"] == warmup == min(50, steps // 10)
    assert (out / "final" / "diffusion_pytorch_model.safetensors").is_file()
    # All the steps, or (on a machine whose speed wandered after the trials) as many as the safety net allowed,
    # stopping with its checkpoint: a full-suite run here once stopped at 80 of 116.
    (last,) = (out / "checkpoints").iterdir()
    stopped = int(last.name.removeprefix("step-"))
    assert 25 < stopped <= steps
    assert 0 < recorded["run"]["time_limit_minutes"] < budget_s / 60  # the safety net, inside the budget
    # The point of the script; loose, since a loaded machine's step time wanders between trial and run.
    assert elapsed < 2 * budget_s


def test_a_resumed_budgeted_run_is_refused():
    script = load_script("train_for")
    with pytest.raises(SystemExit):
        script.main(["--minutes", "1", "--config", "tiny", "run.resume=true"])
