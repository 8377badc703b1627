"""What counts as a step: gradient accumulation beside a discriminator, the schedule on several processes, a
process whose whole batch is unreadable, and checkpoints of two runs in one folder."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from test_trainer import FAST, REPO, final_weights, photos_and_a_broken_file, run_training

from training.checkpoint import read_states
from training.state import CheckpointConflict, prune_checkpoints


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # tiny.yaml names its data relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _optimizer_steps(checkpoint: Path) -> int:
    return int(read_states(checkpoint)["optimizer"]["state"][0]["step"])


def test_accumulation_beside_a_discriminator_counts_micro_batches_once(tmp_path):
    common = ["run.max_steps=2", "run.checkpoint_every=2", "run.gradient_accumulation_steps=2"]
    plain = run_training(tmp_path / "plain", *common)
    # A discriminator that has not started yet changes nothing in the autoencoder's updates.
    with_disc = run_training(tmp_path / "disc", *common, "loss.disc_start=1000")
    checkpoint = with_disc / "checkpoints" / "step-0000002"
    assert _optimizer_steps(checkpoint) == 2
    state = read_states(checkpoint)["loop"]
    # 7 photos in batches of 2, accumulated 2: an epoch is one whole step (4 images), so step 2 is the second
    # epoch's two micro-batches. Counted per micro-batch, the run had stopped after step 1.
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (2, 1, 2)
    a, b = final_weights(plain), final_weights(with_disc)
    assert all(torch.equal(a[key], b[key]) for key in a)


def _launch(args: list[str], processes: int, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--multi_gpu", "--num_processes", str(processes)]
    return subprocess.run(
        [*command, "-m", "training", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_two_processes_keep_the_schedule_and_survive_a_batch_of_unreadable_images(tmp_path):
    photos = photos_and_a_broken_file(tmp_path)
    out = tmp_path / "run"
    # Batches of one per process, so each epoch one process's whole batch is the broken file; validation reads
    # it too. Cosine with warm-up: the schedule must count the 4 optimizer steps, not 4 per process.
    args = ["--config", "tiny", *FAST, "run.batch_size=1", f"data.train={photos}", f"data.validation={photos}"]
    args += ["run.max_steps=4", "run.checkpoint_every=4", "run.validate_every=2", f"run.output_dir={out}"]
    args += ["optimizer.schedule=cosine", "optimizer.warmup_steps=2"]
    try:
        result = _launch(args, processes=2, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the two processes waited on each other: one skipped a step the other took")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step-0000004"
    assert _optimizer_steps(checkpoint) == 4
    scheduler = read_states(checkpoint)["scheduler"]
    assert scheduler["last_epoch"] == 4 and scheduler["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
    validation = (out / "validation.log").read_text().splitlines()
    assert [line.split(":")[0] for line in validation] == ["step 2", "step 4"]


def test_a_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path):
    from training.__main__ import main

    out = run_training(tmp_path / "run", "run.max_steps=2", "run.checkpoint_every=1", "run.keep_checkpoints=2")
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointConflict, match=r"already holds checkpoints .*latest step-0000002.*--resume"):
        run_training(out, "run.max_steps=1", "run.seed=1")
    assert (out / "config.yaml").read_text() == config_before  # refused before writing anything
    code = main(["--config", "tiny", f"run.output_dir={out}", "run.max_steps=1"])
    assert code == 2
    with pytest.raises(CheckpointConflict, match=r"step-0000001: later checkpoints .*step-0000002"):
        run_training(out, "run.max_steps=3", f"run.resume={out / 'checkpoints' / 'step-0000001'}")
    run_training(out, "run.max_steps=3", "run.resume=true")  # continuing the run itself is what it is for


def test_rotation_never_removes_the_checkpoint_just_written(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 3, 4, 6):
        (folder / f"step-{step:07d}").mkdir(parents=True)
    prune_checkpoints(tmp_path, keep=2, current=folder / "step-0000004")
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000003", "step-0000004", "step-0000006"]
    prune_checkpoints(tmp_path, keep=1, current=folder / "step-0000003")
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000003", "step-0000004", "step-0000006"]


def test_a_resumed_run_uses_the_configured_learning_rate_and_ema_decay(tmp_path, caplog):
    out = tmp_path / "run"
    common = ["run.checkpoint_every=2", "optimizer.schedule=constant", "optimizer.warmup_steps=0"]
    run_training(out, *common, "run.max_steps=2", "optimizer.lr=1e-3", "optimizer.ema_decay=0.9")
    with caplog.at_level("WARNING"):
        run_training(out, *common, "run.max_steps=4", "optimizer.lr=1e-4", "optimizer.ema_decay=0.5", "run.resume=true")
    assert "optimizer.lr 0.001 -> 0.0001" in caplog.text and "run.max_steps 2 -> 4" in caplog.text
    checkpoint = out / "checkpoints" / "step-0000004"
    states = read_states(checkpoint)
    assert [group["lr"] for group in states["optimizer"]["param_groups"]] == [pytest.approx(1e-4)]
    assert states["ema"]["decay"] == 0.5


def test_a_checkpoint_saved_again_at_its_step_replaces_the_old_one_only_once_complete(tmp_path):
    from training.checkpoint import write_checkpoint

    class Saving:  # the part of Accelerator that write_checkpoint uses
        is_main_process, process_index = True, 0

        def wait_for_everyone(self) -> None:
            pass

    old = tmp_path / "checkpoints" / "step-0000005"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_text("old")
    (tmp_path / "checkpoints" / "step-0000005.partial").mkdir()  # left by a run killed while saving
    (tmp_path / "checkpoints" / "step-0000005.partial" / "rng.rank1.json").write_text("{}")
    write_checkpoint(Saving(), tmp_path, 5, lambda: {"model": {"w": torch.ones(2)}}, keep=1)
    assert read_states(old)["model"]["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in old.iterdir()) == ["model.safetensors", "rng.rank0.json", "state.json"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000005"]


@pytest.mark.parametrize("growth_interval", [1, 2000])
def test_fp16_discriminator_learns_from_every_micro_batch(growth_interval):
    # accelerate makes no loss scaler on a CPU, so one is put in its place, as on a GPU under fp16. SGD at lr 1 on
    # linear models: the discriminator's weights move by exactly the gradient applied, which must be the mean
    # over both micro-batches, also when the autoencoder's scaler grows its scale at every step (growth 1).
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from training.step import DiscriminatorStep, clip_autoencoder_gradients

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(mixed_precision="fp16", cpu=True, gradient_accumulation_steps=2)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=growth_interval)
        torch.manual_seed(0)
        vae, disc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        prepared = accelerator.prepare(
            vae, torch.optim.SGD(vae.parameters(), lr=1.0), disc, torch.optim.SGD(disc.parameters(), lr=1.0)
        )
        vae, optimizer, disc, disc_optimizer = prepared
        accelerator.native_amp = True  # after prepare: unscaling is live; the toy models run without autocast
        disc_step = DiscriminatorStep(accelerator, disc_optimizer)
        updates = []
        accelerator.scaler.update = lambda update=accelerator.scaler.update: updates.append(update())
        for step in range(3):
            before = disc.weight.detach().clone()
            inputs = [torch.full((1, 4), float(2 * step + m + 1)) for m in range(2)]
            for x in inputs:
                with accelerator.accumulate(vae, disc):
                    reconstruction = vae(x)
                    accelerator.backward(reconstruction.pow(2).mean())
                    if accelerator.sync_gradients:
                        clip_autoencoder_gradients(accelerator, optimizer, list(vae.parameters()), 1e9)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    disc_step(disc(reconstruction.detach() * 0 + x).sum())  # gradient w.r.t. the weight: x
            torch.testing.assert_close(before - disc.weight.detach(), sum(inputs) / 2)
        assert len(updates) == 3  # the autoencoder's scaler: one update per step
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_resume_without_a_checkpoint_and_a_missing_tracker_are_said(tmp_path, caplog, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    with caplog.at_level("WARNING", logger="training"):
        run_training(tmp_path / "run", *FAST, "run.max_steps=1", "run.resume=true", "run.log_with=tensorboard")
    assert "no checkpoint in" in caplog.text and "new run from step 0" in caplog.text
    assert caplog.text.count("tensorboard is not installed (pip install tensorboard)") == 1


def test_an_fp16_discriminator_resumed_from_a_checkpoint_without_its_scaler_starts_at_the_shared_scale(tmp_path):
    # A checkpoint of a bf16 run holds no discriminator scaler; under fp16 it starts where the shared one stands.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from training.step import DiscriminatorStep
    from training.trainer_state import _start_afresh

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(mixed_precision="fp16", cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        disc = torch.nn.Linear(4, 1)
        _, disc_optimizer = accelerator.prepare(disc, torch.optim.SGD(disc.parameters(), lr=1.0))
        trainer = types.SimpleNamespace(
            accelerator=accelerator, disc_step=DiscriminatorStep(accelerator, disc_optimizer)
        )
        assert trainer.disc_step.scaler.get_scale() != 2.0**10
        _start_afresh(trainer, "disc_scaler")
        assert trainer.disc_step.scaler.get_scale() == 2.0**10
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_a_step_the_fp16_scaler_skips_leaves_the_schedule_and_the_ema_where_they_were():
    # An overflowing gradient: the scaler skips the optimizer step, so the warm-up and the EMA must not advance
    # either (they would spend their first steps on weights that never moved). The next, finite step advances both.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from training.state import EMA
    from training.step import step_schedules

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(mixed_precision="fp16", cpu=True, step_scheduler_with_optimizer=False)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step + 1.0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        ema = EMA(model, 0.9)
        accelerator.native_amp = True
        stepped = []
        for value in (float("inf"), 1.0):
            before = model.weight.detach().clone()
            with accelerator.accumulate(model):
                accelerator.backward(model(torch.full((1, 2), value)).sum())
                optimizer.step()
                stepped.append(step_schedules(accelerator, optimizer, scheduler, ema, model))
                optimizer.zero_grad(set_to_none=True)
            assert torch.equal(before, model.weight.detach()) != stepped[-1]
            stepped += [scheduler.get_last_lr()[0], ema.updates]
        assert stepped == [False, 1.0, 0, True, 2.0, 1]
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.slow
def test_two_processes_resumed_end_where_they_would_have_on_every_process(tmp_path):
    from safetensors.torch import load_file

    every_rank = str(Path(__file__).with_name("every_rank.py"))  # saves each process's trained weights
    common = ["--config", "tiny", *FAST, "run.batch_size=1", "run.checkpoint_every=2", "optimizer.ema_decay=0.9"]

    def launch(out: Path, *args: str) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        accelerate = Path(sys.executable).with_name("accelerate")
        command = [str(accelerate), "launch", "--num_machines", "1", "--mixed_precision", "no", "--multi_gpu"]
        command += ["--dynamo_backend", "no", "--num_processes", "2", every_rank, *common, f"run.output_dir={out}"]
        result = subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    launch(tmp_path / "straight", "run.max_steps=4")
    launch(tmp_path / "resumed", "run.max_steps=2")
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000002" / "rng.rank1.json").is_file()
    launch(tmp_path / "resumed", "run.max_steps=4", "--resume")
    for rank in (0, 1):
        a = load_file(str(tmp_path / "straight" / f"weights.rank{rank}.safetensors"))
        b = load_file(str(tmp_path / "resumed" / f"weights.rank{rank}.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a), rank
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")  # the EMA, resumed too
    assert all(torch.equal(a[key], b[key]) for key in a)
