"""A checkpoint is read without running code: a pickle planted in place of any of its files, or beside them, is
refused in one line naming it (or never read), and a damaged checkpoint names the complete one before it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_trainer import FAST, REPO, _reset_accelerate, final_weights, plant_pickle, run_training

OVERRIDES = [*FAST, "run.max_steps=2", "run.checkpoint_every=1", "optimizer.ema_decay=0.9", "loss.disc_start=0"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of two steps with an EMA and a discriminator, a checkpoint after each."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setenv("HF_HUB_OFFLINE", "1")
        return run_training(tmp_path_factory.mktemp("finished") / "run", *OVERRIDES, "run.export=false")


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _resume(out: Path, capsys, *extra: str) -> tuple[int, str]:
    from training.__main__ import main

    _reset_accelerate()
    try:
        code = main(["--config", "tiny", *OVERRIDES, "run.max_steps=3", f"run.output_dir={out}", *extra, "--resume"])
    finally:
        _reset_accelerate()
    return code, capsys.readouterr().err


def _one_error_line(err: str, prefix: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def test_a_checkpoint_holds_safetensors_and_json_only(finished_run):
    names = {path.name for path in (finished_run / "checkpoints" / "step-0000002").iterdir()}
    assert names == {
        "state.json", "rng.rank0.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors",
        "discriminator.safetensors", "disc_optimizer.safetensors",
    }  # fmt: skip


def test_a_pickle_in_place_of_any_checkpoint_file_is_refused_unrun(finished_run, tmp_path, capsys):
    files = sorted((finished_run / "checkpoints" / "step-0000002").iterdir())
    for original in files:
        out = _copy(finished_run, tmp_path / original.name)
        planted = out / "checkpoints" / "step-0000002" / original.name
        marker = tmp_path / f"ran-{original.name}"
        plant_pickle(planted, marker, size=original.stat().st_size)  # the same size: the reader itself refuses
        code, err = _resume(out, capsys)
        assert not marker.exists(), f"unpickling {original.name} ran code"
        assert code == 2
        assert str(planted) in _one_error_line(err, "training: error:")


def test_pickles_planted_beside_the_checkpoint_files_are_never_read(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    checkpoint = out / "checkpoints" / "step-0000002"
    names = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin", "scaler.pt")
    for name in names:
        plant_pickle(checkpoint / name, tmp_path / f"ran-{name}")
    code, err = _resume(out, capsys)
    assert code == 0, err[-2000:]
    assert not list(tmp_path.glob("ran-*"))
    assert (out / "checkpoints" / "step-0000003" / "state.json").is_file()


def test_export_refuses_a_planted_pickle_in_one_line_and_ignores_files_it_does_not_read(finished_run, tmp_path, capsys):
    from training.export import main as export_main

    checkpoint_files = sorted((finished_run / "checkpoints" / "step-0000002").iterdir())
    originals = [*checkpoint_files, finished_run / "model-config.json"]
    for original in originals:
        out = _copy(finished_run, tmp_path / original.name)
        planted = out / original.relative_to(finished_run)
        marker = tmp_path / f"ran-{original.name}"
        plant_pickle(planted, marker, size=original.stat().st_size)
        code = export_main([str(out / "checkpoints" / "step-0000002"), str(tmp_path / original.name / "exported")])
        err = capsys.readouterr().err
        assert not marker.exists(), f"unpickling {original.name} ran code"
        if original.name in ("model.safetensors", "ema.safetensors", "state.json", "model-config.json"):
            assert code == 2
            assert str(planted) in _one_error_line(err, "training.export: error:")
        else:  # the optimizers, the discriminator and the random generators: not part of the export
            assert code == 0, err


def test_a_truncated_checkpoint_names_its_file_and_the_complete_one_before_it(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    damaged = out / "checkpoints" / "step-0000002"
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # as a full disk would leave it
    code, err = _resume(out, capsys)
    assert code == 2
    line = _one_error_line(err, "training: error:")
    assert str(weights) in line and "truncated" in line and "step-0000001, is complete" in line
    damaged.rename(damaged.with_name("step-0000002.damaged"))  # as the message says
    code, err = _resume(out, capsys)
    assert code == 0, err[-2000:]
    assert final_weights(out)


def test_a_checkpoint_of_the_older_pickled_layout_is_refused_with_the_way_to_its_weights(
    finished_run, tmp_path, capsys
):
    out = _copy(finished_run, tmp_path)
    checkpoint = out / "checkpoints" / "step-0000002"
    for path in checkpoint.iterdir():
        if path.name != "model.safetensors":
            path.unlink()
    plant_pickle(checkpoint / "custom_checkpoint_0.pkl", tmp_path / "ran")
    code, err = _resume(out, capsys)
    assert code == 2 and not (tmp_path / "ran").exists()
    assert "older, pickled layout" in _one_error_line(err, "training: error:")


def test_every_kind_of_state_comes_back_as_it_was_saved(tmp_path):
    import torch

    from training.checkpoint import read_states, save_states
    from training.trainer_state import _load_like, _load_optimizer

    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7)
    odd = {"half": torch.randn(2, dtype=torch.bfloat16), "count": torch.tensor(3), "none": None, "inf": float("inf")}
    states = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "odd": odd}
    save_states(tmp_path, states)
    loaded = read_states(tmp_path)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.9)  # a tuple again, not a list
    for index, moments in optimizer.state_dict()["state"].items():  # int keys, as the optimizer numbers them
        assert all(torch.equal(loaded["optimizer"]["state"][index][k], v) for k, v in moments.items())
    assert loaded["odd"]["half"].dtype == torch.bfloat16 and torch.equal(loaded["odd"]["half"], odd["half"])
    assert loaded["odd"]["count"].item() == 3 and loaded["odd"]["none"] is None and loaded["odd"]["inf"] == float("inf")
    restored = torch.amp.GradScaler("cpu")
    _load_like(restored, loaded["scaler"], "scaler")
    assert restored.get_scale() == 2.0**7
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    _load_optimizer(resumed, loaded["optimizer"], "optimizer")
    assert resumed.state[model.weight]["exp_avg"].stride() == model.weight.stride()  # channels-last, as saved


@pytest.mark.parametrize(
    ("part", "edit"),
    [
        ("loop", lambda state: state.update(step="2")),
        ("scheduler", lambda state: state.update(optimizer=None)),  # would replace the scheduler's optimizer
        ("optimizer", lambda state: state["param_groups"][0].update(lr="fast")),
    ],
)
def test_a_tampered_state_is_named_in_one_line(finished_run, tmp_path, capsys, part, edit):
    import json

    out = _copy(finished_run, tmp_path)
    record_path = out / "checkpoints" / "step-0000002" / "state.json"
    record = json.loads(record_path.read_text())
    edit(record["parts"][part])
    record_path.write_text(json.dumps(record))
    code, err = _resume(out, capsys)
    assert code == 2
    assert f"{record_path}: its {part} state does not fit this run" in _one_error_line(err, "training: error:")
