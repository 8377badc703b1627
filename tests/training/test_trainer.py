"""The trainer end to end on the tiny config: resume exactness, decoder-only, export, multi-process equality."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import codec
from training.checkpoint import read_states
from training.config import load_config

REPO = Path(__file__).resolve().parents[2]
FAST = ["data.resolution=32", "run.batch_size=2", "run.validate_every=100", "loss.lpips_weight=0.0"]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_training(out: Path, *overrides: str, lpips_pretrained: bool = False) -> Path:
    from training.train import train

    _reset_accelerate()
    config = load_config("tiny", [*FAST, f"run.output_dir={out}", *overrides])
    try:
        return train(config, lpips_pretrained=lpips_pretrained)
    finally:
        _reset_accelerate()


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "diffusion_pytorch_model.safetensors"))


def plant_pickle(path: Path, marker: Path, size: int | None = None) -> None:
    """Replace `path` with a pickle that creates `marker` when unpickled, padded to `size` bytes if given."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = pickle.dumps(Payload())
    path.write_bytes(data + b"\0" * max(0, (size or 0) - len(data)))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # tiny.yaml names its data relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path):
    straight = run_training(tmp_path / "straight", "run.max_steps=4", "run.checkpoint_every=2")
    # First half stops at step 2, mid-epoch (3 batches of 2 per epoch), then a second process resumes.
    run_training(tmp_path / "resumed", "run.max_steps=2", "run.checkpoint_every=2", "run.export=false")
    assert not (tmp_path / "resumed" / "final").exists()
    run_training(tmp_path / "resumed", "run.max_steps=4", "run.checkpoint_every=2", "run.resume=true")
    a, b = final_weights(straight), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    initial = codec.AutoencoderKL(codec.preset("tiny")).state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a), "training changed nothing"


def test_a_time_limit_stops_the_run_validated_checkpointed_and_exported(tmp_path):
    # One process checks the clock after every step, not only at log steps (here every 1000th).
    limit = ["run.max_steps=100000", "run.time_limit_minutes=0.001", "run.log_every=1000", "run.checkpoint_every=1000"]
    limit.append("optimizer.ema_decay=0.9")
    out = run_training(tmp_path / "run", *limit)
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].name.removeprefix("step-"))
    assert 0 < stopped_at < 10  # 0.06 s is past after the first step or two, long before any log step
    validation = (out / "validation.log").read_text()
    assert f"step {stopped_at}:" in validation and "trained_psnr" in validation  # with an EMA, both are validated
    assert (out / "final" / "diffusion_pytorch_model.safetensors").is_file()


def photos_and_a_broken_file(tmp_path: Path) -> Path:
    """Three of the test photos and one file that is not an image, in a new folder."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("camera.png", "chelsea.png", "astronaut.jpg"):
        (photos / name).write_bytes((REPO / "tests" / "data" / "photos" / name).read_bytes())
    (photos / "broken.png").write_bytes(b"not a png")
    return photos


def test_unreadable_images_are_counted_though_summed_only_at_log_and_checkpoint_steps(tmp_path):
    photos = photos_and_a_broken_file(tmp_path)
    # 4 files, batches of 2, so every epoch reads all four: one skip per 2 steps. Logged at step 3, saved at 4.
    overrides = [f"data.train={photos}", "run.max_steps=4", "run.log_every=3", "run.checkpoint_every=4"]
    out = run_training(tmp_path / "run", *overrides)
    state = read_states(out / "checkpoints" / "step-0000004")["loop"]
    assert (state["step"], state["skipped_images"]) == (4, 2)


def test_decoder_only_leaves_the_encoder_bit_identical(tmp_path):
    torch.manual_seed(3)
    start = codec.AutoencoderKL(codec.preset("tiny"))
    start.save_pretrained(tmp_path / "init")
    out = run_training(
        tmp_path / "run",
        "model.preset=null",
        f"model.init={tmp_path / 'init'}",
        "model.decoder_only=true",
        "run.max_steps=2",
        "run.checkpoint_every=2",
        "loss.lpips_weight=0.1",
    )
    trained = final_weights(out)
    before = start.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(trained[k], before[k]) for k in frozen)
    assert any(not torch.equal(trained[k], before[k]) for k in before if k.startswith("decoder."))


def test_export_loads_in_diffusers_with_the_same_outputs(tmp_path):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    out = run_training(tmp_path / "run", "run.max_steps=1", "run.checkpoint_every=1", "optimizer.ema_decay=0.9")
    ours = codec.AutoencoderKL.from_pretrained(out / "final")
    theirs = DiffusersAutoencoderKL.from_pretrained(out / "final").eval()
    single = codec.AutoencoderKL.from_single_file(out / "final" / "vae.safetensors", config=out / "final")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = ours(x).sample
        # 1e-4, not 1e-5: our inference runs channels-last, which changes the convolutions' summation order;
        # diffusers' own channels-last and NCHW outputs differ by as much (about 1e-5 here, 9e-5 at 256x256).
        assert torch.allclose(theirs(x).sample, expected, atol=1e-4)
        assert torch.allclose(single(x).sample, expected, atol=1e-6)
    assert (out / "config.yaml").is_file() and list((out / "samples").glob("*.png"))


def _launch(args: list[str], processes: int, module: str = "training") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    target = ["-m", module] if module == "training" else [module]
    return subprocess.run([*command, *target, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _order(path: Path) -> dict[int, list[int]]:
    steps = {}
    for line in path.read_text().splitlines():
        step, *indices = map(int, line.split())
        steps[step] = indices
    return steps


def test_two_processes_split_the_data_and_every_one_matches_one_process(tmp_path):
    common = ["--config", "tiny", *FAST, "run.max_steps=3", "run.checkpoint_every=3", "run.record_data_order=true"]
    every_rank = str(Path(__file__).with_name("every_rank.py"))  # also saves each process's weights
    two = _launch([*common, "run.batch_size=1", f"run.output_dir={tmp_path / 'two'}"], processes=2, module=every_rank)
    assert two.returncode == 0, two.stderr[-3000:]
    # The reference runs in this process: the same trainer, without a second launch's start-up.
    run_training(tmp_path / "one", *common[2:], "run.batch_size=2")  # common[2:]: the overrides

    rank0, rank1 = _order(tmp_path / "two" / "data_order.rank0.txt"), _order(tmp_path / "two" / "data_order.rank1.txt")
    single = _order(tmp_path / "one" / "data_order.rank0.txt")
    for step in single:
        assert not set(rank0[step]) & set(rank1[step]), f"step {step}: both ranks read the same image"
        assert sorted(rank0[step] + rank1[step]) == sorted(single[step])

    reference = final_weights(tmp_path / "one")
    for rank in (0, 1):
        weights = load_file(str(tmp_path / "two" / f"weights.rank{rank}.safetensors"))
        assert weights.keys() == reference.keys()
        for key in reference:
            assert torch.allclose(weights[key], reference[key], atol=1e-5, rtol=1e-4), (rank, key)
    # Each process keeps its own random generators in the checkpoint.
    checkpoint = tmp_path / "two" / "checkpoints" / "step-0000003"
    assert (checkpoint / "rng.rank0.json").is_file() and (checkpoint / "rng.rank1.json").is_file()


def test_a_launch_that_forms_no_group_is_refused(monkeypatch):
    from accelerate.utils import DistributedType

    from codec import distributed

    class Lonely:  # what Accelerator() gives each process of a CPU launch made without cpu=True
        distributed_type = DistributedType.NO
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: Lonely())
    with pytest.raises(distributed.DistributedSetupError, match="launched with 2 processes"):
        distributed.make_accelerator()


def test_adversarial_training_runs_and_checkpoints_the_discriminator(tmp_path):
    out = run_training(
        tmp_path / "gan", "run.max_steps=2", "run.checkpoint_every=2", "loss.disc_start=1", "run.mixed_precision=bf16"
    )
    checkpoint = out / "checkpoints" / "step-0000002"
    assert (checkpoint / "discriminator.safetensors").is_file()  # saved with the autoencoder
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())
    # bf16 autocast computes in half precision, but the weights and Adam's moments stay fp32 (diffusers' research
    # script cast the trainable weights themselves to half).
    checkpointed = load_file(str(checkpoint / "model.safetensors"))
    assert {t.dtype for t in checkpointed.values()} == {torch.float32}
    states = read_states(checkpoint)
    moments = states["optimizer"]["state"].values()
    assert {m[name].dtype for m in moments for name in ("exp_avg", "exp_avg_sq")} == {torch.float32}
    # Its optimizer decays weights as configured (tiny: 0), not by AdamW's own default of 0.01.
    assert {group["weight_decay"] for group in states["disc_optimizer"]["param_groups"]} == {0.0}


def test_too_few_images_for_one_step_is_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    from training.__main__ import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "--config",
                "tiny",
                *FAST,
                "run.batch_size=4",
                "run.gradient_accumulation_steps=2",
                f"run.output_dir={out}",
            ]
        )
        == 2
    )
    assert (
        "training images make no full step of 8 (run.batch_size 4 x gradient_accumulation_steps 2 x 1 processes)"
        in capsys.readouterr().err
    )
    assert not out.exists()


def test_every_step_sees_its_whole_accumulated_batch(tmp_path):
    # 6 photos, batch 1, accumulation 4: an epoch is one whole step; the 2 left over had made a half step.
    overrides = [
        "run.batch_size=1",
        "run.gradient_accumulation_steps=4",
        "run.max_steps=3",
        "run.record_data_order=true",
    ]
    out = run_training(tmp_path / "run", *overrides)
    steps = [int(line.split()[0]) for line in (out / "data_order.rank0.txt").read_text().splitlines()]
    assert steps == [0] * 4 + [1] * 4 + [2] * 4


def test_a_resumed_run_records_the_steps_it_trains_again_once(tmp_path):
    overrides = ["run.max_steps=3", "run.checkpoint_every=2", "run.record_data_order=true"]
    out = run_training(tmp_path / "run", *overrides)
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # as if killed after step 3, before its checkpoint
    run_training(tmp_path / "run", *overrides, "run.resume=true")
    steps = [int(line.split()[0]) for line in (out / "data_order.rank0.txt").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_a_checkpoint_exports_like_the_end_of_the_run(tmp_path, capsys):
    from training.export import export_checkpoint
    from training.export import main as export_main

    out = run_training(tmp_path / "run", "run.max_steps=2", "run.checkpoint_every=2", "optimizer.ema_decay=0.5")
    assert export_main([str(out / "checkpoints" / "step-0000002"), str(tmp_path / "exported")]) == 0
    assert f"wrote {tmp_path / 'exported'}" in capsys.readouterr().out
    exported = load_file(str(tmp_path / "exported" / "diffusion_pytorch_model.safetensors"))
    final = final_weights(out)  # the end-of-run export uses the EMA
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    single = codec.AutoencoderKL.from_single_file(tmp_path / "exported" / "vae.safetensors").state_dict()
    assert all(torch.equal(single[k], final[k]) for k in final)
    raw = export_checkpoint(out / "checkpoints" / "step-0000002", tmp_path / "raw", use_ema=False).state_dict()
    assert any(not torch.equal(raw[k], final[k]) for k in final), "with decay 0.5 the EMA differs from the weights"
    assert export_main([str(out / "checkpoints" / "step-0000002"), str(tmp_path / "half"), "--no-ema", "--fp16"]) == 0
    half = load_file(str(tmp_path / "half" / "diffusion_pytorch_model.safetensors"))
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], raw[k].half()) for k in raw)


def test_a_checkpoint_of_the_older_pickled_layout_still_exports_read_safely(tmp_path, capsys):
    from training.export import export_checkpoint
    from training.export import main as export_main

    out = run_training(tmp_path / "run", "run.max_steps=1", "run.checkpoint_every=1", "optimizer.ema_decay=0.5")
    new = read_states(out / "checkpoints" / "step-0000001")
    # As accelerate's save_state wrote it: the weights in safetensors, the rest pickled, numbered in order of
    # registration (loop state, then the EMA or a discriminator's GradScaler).
    old = tmp_path / "old" / "checkpoints" / "step-0000001"
    old.mkdir(parents=True)
    shutil.copy(out / "model-config.json", tmp_path / "old")
    shutil.copy(out / "checkpoints" / "step-0000001" / "model.safetensors", old)
    torch.save(new["loop"], old / "custom_checkpoint_0.pkl")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), old / "custom_checkpoint_1.pkl")
    raw = export_checkpoint(old, tmp_path / "raw").state_dict()
    assert all(torch.equal(raw[k], new["model"][f"vae.{k}"]) for k in raw)
    torch.save(new["ema"], old / "custom_checkpoint_1.pkl")
    averaged = export_checkpoint(old, tmp_path / "averaged").state_dict()
    final = final_weights(out)
    assert all(torch.equal(averaged[k], final[k]) for k in final)

    plant_pickle(old / "custom_checkpoint_1.pkl", tmp_path / "ran")
    capsys.readouterr()  # the run's progress bar
    assert export_main([str(old), str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert not (tmp_path / "ran").exists()
    assert err.count("\n") == 1 and f"{old / 'custom_checkpoint_1.pkl'}: holds pickled objects" in err


def test_a_checkpoint_exports_after_the_runs_initial_weights_are_gone(tmp_path):
    from training.export import export_checkpoint

    start = tmp_path / "start"
    codec.AutoencoderKL.load("preset:tiny").save_pretrained(start)
    out = run_training(
        tmp_path / "run", "model.preset=null", f"model.init={start}", "run.max_steps=1", "run.checkpoint_every=1"
    )
    start.rename(tmp_path / "moved")  # or a hub id, offline: the checkpoint alone must be enough
    exported = export_checkpoint(out / "checkpoints" / "step-0000001", tmp_path / "exported").state_dict()
    final = final_weights(out)
    assert all(torch.equal(exported[k], final[k]) for k in final)


def test_ema_warms_up_instead_of_averaging_the_random_start():
    from training.state import EMA

    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update: decay (1+0)/(10+0) = 0.1, so the average moves 90% of the way
    assert torch.allclose(ema.shadow["weight"], 0.1 * start + 0.9, atol=1e-6)
    for _ in range(10_000):  # the ramp passes 0.999 after about 9000 updates
        ema.update(model)
    assert ema.current_decay() == 0.999
    assert torch.allclose(ema.shadow["weight"], torch.ones(2, 2), atol=1e-3)
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == ema.updates and restored.decay == 0.5  # the configured decay, not the saved one


def test_ema_follows_the_model_to_its_device():
    """The EMA is built before prepare() moves the model (to a GPU in real runs; "meta" stands in for it here)."""
    from training.state import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    model.to("meta")
    ema.update(model)
    assert all(shadow.device.type == "meta" for shadow in ema.shadow.values())


def test_fp16_on_a_cpu_says_it_trains_in_fp32(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="training"):
        run_training(tmp_path / "run", "run.max_steps=1", "run.mixed_precision=fp16")
    assert "on a CPU accelerate trains in fp32" in caplog.text


def test_a_run_whose_every_image_is_unreadable_stops_with_an_error(tmp_path, capsys):
    from training.__main__ import main

    bad = tmp_path / "bad"
    bad.mkdir()
    for index in range(8):
        (bad / f"img{index}.png").write_bytes(b"not an image" if index % 2 else b"")
    _reset_accelerate()
    try:
        code = main(["--config", "tiny", *FAST, f"data.train={bad}", f"run.output_dir={tmp_path / 'run'}",
                     "run.max_steps=4", "run.log_every=2", "run.checkpoint_every=100"])  # fmt: skip
    finally:
        _reset_accelerate()
    assert code == 2  # it had trained on blank stand-ins, exported final/ and exited 0
    assert "every image read since the last log step was unreadable" in capsys.readouterr().err
    assert not (tmp_path / "run" / "final").exists()


def test_an_output_dir_that_is_a_file_and_exports_of_what_is_no_checkpoint_are_one_line_errors(tmp_path, capsys):
    from training.__main__ import main
    from training.export import main as export_main

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["--config", "tiny", f"run.output_dir={afile}"]) == 2
    assert f"run.output_dir {afile}: is a file" in capsys.readouterr().err

    out = run_training(tmp_path / "run", "run.max_steps=1", "run.checkpoint_every=1")
    capsys.readouterr()  # the run's progress bar
    step = out / "checkpoints" / "step-0000001"
    lone = tmp_path / "lone" / "step-1"  # a checkpoint copied out of its run folder
    shutil.copytree(step, lone)
    damaged = tmp_path / "damaged" / "checkpoints" / "step-1"
    shutil.copytree(step, damaged)
    shutil.copy(out / "model-config.json", tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for checkpoint, reason in ((tmp_path / "nope", "not a checkpoint"), (lone, "has neither"), (damaged, "")):
        assert export_main([str(checkpoint), str(tmp_path / "exported")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("training.export: error:") and reason in err and "Traceback" not in err
        assert str(checkpoint) in err
    assert not (tmp_path / "exported").exists()


def test_ctrl_c_says_how_to_resume_instead_of_a_traceback(tmp_path, capsys, monkeypatch):
    import training.train
    from training.__main__ import main

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.train, "train", interrupted)
    assert main(["--config", "tiny", f"run.output_dir={tmp_path / 'run'}"]) == 130
    assert f"`--resume` continues from the last checkpoint in {tmp_path / 'run'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["model.preset=null", "model.init={missing}"], "no such folder or file"),
        (["loss.lpips_weight=0.1"], "could not be fetched"),  # LPIPS' trunk weights, offline
    ],
)
def test_a_model_or_lpips_that_cannot_load_leaves_no_run_folder(tmp_path, capsys, monkeypatch, overrides, reason):
    import socket
    import urllib.error

    from training.__main__ import main
    from training.losses import lpips_available

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    lpips_available.cache_clear()
    out = tmp_path / "run"
    filled = [o.format(missing=tmp_path / "missing") for o in overrides]
    assert main(["--config", "tiny", *FAST, *filled, f"run.output_dir={out}"]) == 2
    assert reason in capsys.readouterr().err
    assert not out.exists()
    lpips_available.cache_clear()


def test_lpips_and_the_adversarial_term_reach_the_autoencoder(tmp_path):
    # The same two steps with each term added: a loop that built a term but left it out of the loss it
    # differentiates (or computed it without gradient) would end with the plain run's weights.
    base = final_weights(run_training(tmp_path / "base", "run.max_steps=2", "run.checkpoint_every=2"))
    for name, term in (("lpips", "loss.lpips_weight=1.0"), ("gan", "loss.disc_start=0")):
        weights = final_weights(run_training(tmp_path / name, "run.max_steps=2", "run.checkpoint_every=2", term))
        changed = [key for key in base if key.startswith("decoder.") and not torch.equal(weights[key], base[key])]
        assert len(changed) > len([key for key in base if key.startswith("decoder.")]) // 2, name
