"""The run's records: metrics.jsonl and curves.png written as it trains, each step once across a resume."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from test_trainer import REPO, run_training

from training.records import append_metrics, curve_series, draw_curves, forget_after, read_metrics


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _steps(records: list[dict], kind: str) -> list[int]:
    return [r["step"] for r in records if r["kind"] == kind]


def test_a_run_records_every_log_step_and_validation_and_draws_its_curves(tmp_path):
    overrides = ["run.max_steps=3", "run.log_every=1", "run.validate_every=2", "run.checkpoint_every=3"]
    overrides += ["optimizer.schedule=linear", "optimizer.lr=3e-4", "optimizer.ema_decay=0.9"]
    out = run_training(tmp_path / "run", *overrides)
    records = read_metrics(out / "metrics.jsonl")
    assert _steps(records, "train") == [1, 2, 3] and _steps(records, "validation") == [2, 3]
    train = [r for r in records if r["kind"] == "train"]
    # The rate after k of 3 steps on the linear schedule: 3e-4 x (1 - k/3).
    assert [r["lr"] for r in train] == pytest.approx([2e-4, 1e-4, 0.0], abs=1e-12)
    assert all(r["loss"] > 0 and r["pixel_loss"] > 0 for r in train)
    validation = [r for r in records if r["kind"] == "validation"]
    assert all(r["psnr"] > 0 and r["trained_psnr"] > 0 for r in validation)  # the EMA's and the weights'
    with Image.open(out / "curves.png") as picture:
        assert picture.format == "PNG" and picture.width > 600


def test_a_resumed_run_records_each_step_once(tmp_path):
    overrides = ["run.max_steps=3", "run.log_every=1", "run.checkpoint_every=2", "run.validate_every=1"]
    out = run_training(tmp_path / "run", *overrides)
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # as if killed after step 3, before its checkpoint
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "kind": "tr')  # and cut off mid-line
    run_training(tmp_path / "run", *overrides, "run.resume=true")
    records = read_metrics(out / "metrics.jsonl")
    assert _steps(records, "train") == [1, 2, 3] and _steps(records, "validation") == [1, 2, 3]
    assert [line.split(":")[0] for line in (out / "validation.log").read_text().splitlines()] == [
        "step 1",
        "step 2",
        "step 3",
    ]


def test_a_fresh_run_in_a_folder_whose_run_died_before_its_first_checkpoint_starts_the_records_afresh(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "kind": "train", "loss": 9.0}\n')
    (out / "validation.log").write_text("step 7: psnr 1.0000\n")
    (out / "curves.png").write_bytes(b"an earlier run's picture")
    run_training(out, "run.max_steps=1", "run.checkpoint_every=1")
    assert _steps(read_metrics(out / "metrics.jsonl"), "train") == [1]
    assert (out / "validation.log").read_text().startswith("step 1: ")
    with Image.open(out / "curves.png") as picture:  # this run's, drawn at its validation
        assert picture.format == "PNG"


def test_forget_after_keeps_the_steps_up_to_the_checkpoint_in_both_records(tmp_path):
    lines = [{"step": s, "kind": "train", "loss": 1.0} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "garbage\n")
    # A kill can cut a line where its step still reads: kept, the next append would run on from it.
    (tmp_path / "validation.log").write_text("step 2: psnr 20.0000\nstep 4: psnr 21.0000\nstep 1")
    forget_after(tmp_path, 2)
    assert _steps(read_metrics(tmp_path / "metrics.jsonl"), "train") == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2  # the unreadable line went too
    assert (tmp_path / "validation.log").read_text() == "step 2: psnr 20.0000\n"


def test_values_that_are_not_finite_are_written_as_null(tmp_path):
    append_metrics(tmp_path, 3, "train", {"loss": float("nan"), "kl": float("inf"), "lr": 1e-4})
    line = (tmp_path / "metrics.jsonl").read_text()

    def strict(constant: str):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(line, parse_constant=strict) == {"step": 3, "kind": "train", "loss": None, "kl": None, "lr": 1e-4}


def test_a_picture_that_cannot_be_drawn_is_a_warning_not_the_end_of_the_run(tmp_path, monkeypatch, caplog):
    from training import records

    append_metrics(tmp_path, 1, "train", {"loss": 0.5})
    monkeypatch.setattr(records, "atomic_path", lambda path: (_ for _ in ()).throw(OSError("No space left")))
    assert draw_curves(tmp_path) is None
    assert "could not draw" in caplog.text and "No space left" in caplog.text


def test_curve_series_draws_each_weighted_term_and_labels_the_ema(tmp_path):
    records = [
        {"step": 1, "kind": "train", "loss": 0.5, "pixel_loss": 0.4, "kl_loss": 1e-4, "g_adv_loss": 0.0, "lr": 1e-4},
        {"step": 2, "kind": "train", "loss": None, "pixel_loss": 0.3, "kl_loss": 2e-4, "g_adv_loss": 0.0},
        {"step": 2, "kind": "validation", "psnr": 21.0, "trained_psnr": 20.5, "kl": 3.0},
    ]
    panels = curve_series(records)
    assert panels["loss"] == {
        "kl_loss": ([1, 2], [1e-4, 2e-4]),
        "loss": ([1], [0.5]),  # the missing (non-finite) value is not drawn
        "pixel_loss": ([1, 2], [0.4, 0.3]),
    }  # the adversarial term, zero throughout (its discriminator has not started), is left out
    assert panels["validation PSNR"] == {"EMA": ([2], [21.0]), "trained weights": ([2], [20.5])}
    assert panels["learning rate"] == {"lr": ([1], [1e-4])}
    no_ema = curve_series([{"step": 5, "kind": "validation", "psnr": 19.0}])
    assert no_ema["validation PSNR"] == {"psnr": ([5], [19.0])} and no_ema["loss"] == {}
    # Once the discriminator runs, the generator's hinge term goes negative: kept, on a symmetric-log axis.
    records.append({"step": 3, "kind": "train", "loss": 0.2, "pixel_loss": 0.3, "g_adv_loss": -0.1})
    assert curve_series(records)["loss"]["g_adv_loss"] == ([1, 2, 3], [0.0, 0.0, -0.1])
    for record in records:
        append_metrics(tmp_path, record["step"], record["kind"], {k: v for k, v in record.items() if k != "step"})
    assert draw_curves(tmp_path) == tmp_path / "curves.png"


def test_nothing_to_draw_leaves_no_picture(tmp_path):
    (tmp_path / "curves.png").write_bytes(b"the picture of records since dropped")
    assert draw_curves(tmp_path) is None and not (tmp_path / "curves.png").exists()
